from promptserve.cli import main

main()
