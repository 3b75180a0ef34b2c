"""promptserve: prompt-aware text-to-image serving."""

from promptserve import native

native.install()  # the compiled hot path, where ``make native`` built it from these sources
