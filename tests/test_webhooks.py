"""Jobs' webhooks (``server/webhooks.py``): signed as Standard Webhooks sign, retried with
backoff after a failure, sent again under the same id after a restart, only to hosts the
operator lists; each tenant's secret from the keys file or made once and shown once."""

import base64
import json
import signal
import time

import httpx
import pytest
from reliability.hooks import Receiver

from promptserve.errors import InputError
from promptserve.server.live import start_server
from promptserve.server.webhooks import (
    Allow,
    parse_allow,
    refusal,
    resolved_refusal,
    signature,
    verify,
)

KEY_A, KEY_B = "key-aaaaaaaaaaaaaaaa", "key-bbbbbbbbbbbbbbbb"
SECRET_A = "whsec_" + base64.b64encode(b"tenant a's own secret!!!").decode()


def valid(delivery: dict, secret: str) -> bool:
    return verify(delivery["headers"], delivery["body"], secret)


def test_the_signature_is_standard_webhooks_and_the_allow_list_is_strict():
    # Standard Webhooks' published example: this id, timestamp, body and secret sign to this
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )
    allow = parse_allow(["hooks.example.com", "10.1.0.0/16"])
    assert refusal("https://hooks.example.com/x", allow) is None
    assert refusal("http://10.1.2.3:9000/x", allow) is None
    assert "10.2.0.1" in refusal("http://10.2.0.1/x", allow)
    assert "not a host" in refusal("https://evil.example.com/x", allow)
    assert "credentials" in refusal("https://u:p@hooks.example.com/x", allow)
    assert "http or https" in refusal("file:///etc/passwd", allow)
    assert "off" in refusal("https://hooks.example.com/x", Allow())
    # a listed name pointed at the server's own network: refused unless that network is listed
    assert "private" in resolved_refusal("hooks.example.com", ["127.0.0.1"], allow)
    assert resolved_refusal("hooks.example.com", ["10.1.9.9", "93.184.216.34"], allow) is None
    with pytest.raises(InputError, match="--webhook-allow"):
        parse_allow(["http://x/y"])


def test_webhooks_are_signed_retried_and_sent_again_after_a_kill_under_the_same_id(tmp_path):
    receiver = Receiver(fail_first=1)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY_A}:tenant-a:{SECRET_A}\n{KEY_B}:tenant-b\n")
    args = [
        "--backend", "modeled", "--model", "sdxl-reference", "--embedder", "hashing", "--slo", "600",
        "--api-keys", str(keys), "--webhook-allow", "127.0.0.1", "--speedup", "20",
    ]  # fmt: skip
    proc, url = start_server(args, tmp_path)
    try:
        a = {"authorization": f"Bearer {KEY_A}"}
        b = {"authorization": f"Bearer {KEY_B}"}
        hooked = {"prompt": "a teapot", "webhook_url": receiver.url}
        first_a = httpx.post(f"{url}/v1/jobs", json=hooked, headers=a, timeout=60).json()
        assert "webhook_secret" not in first_a  # tenant a's is in the keys file
        first_b = httpx.post(f"{url}/v1/jobs", json=hooked, headers=b, timeout=60).json()
        secret_b = first_b["webhook_secret"]  # made for tenant b, shown this once
        again_b = httpx.post(f"{url}/v1/jobs", json=hooked, headers=b, timeout=60).json()
        assert "webhook_secret" not in again_b
        refused = httpx.post(
            f"{url}/v1/jobs", json=hooked | {"webhook_url": "http://192.168.1.1/x"}, headers=a
        )
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "webhook_url"
        sync = httpx.post(f"{url}/v1/images/generations", json=hooked, headers=a, timeout=60)
        assert sync.status_code == 400 and sync.json()["error"]["param"] == "webhook_url"
        deadline = time.monotonic() + 60
        while len({d["headers"]["webhook-id"] for d in receiver.got}) < 3:
            assert time.monotonic() < deadline, receiver.got
            time.sleep(0.1)
        # a job that ends while the server is down is told after the restart
        late = httpx.post(f"{url}/v1/jobs", json=hooked, headers=a, timeout=60).json()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc, url = start_server(args, tmp_path)
        while late["id"] not in [json.loads(d["body"])["data"]["id"] for d in receiver.got]:
            assert time.monotonic() < deadline + 60, receiver.got
            time.sleep(0.1)
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        proc.kill()
        receiver.close()
    secrets = {first_a["id"]: SECRET_A, late["id"]: SECRET_A}
    secrets |= {first_b["id"]: secret_b, again_b["id"]: secret_b}
    for delivery in receiver.got:
        event = json.loads(delivery["body"])
        job_id = event["data"]["id"]
        assert valid(delivery, secrets[job_id]), job_id  # each under its own tenant's secret
        assert not valid(delivery, SECRET_A if secrets[job_id] != SECRET_A else secret_b)
        assert event["type"] == "job.succeeded" and delivery["headers"]["webhook-id"] == (
            f"msg_{job_id}"
        )
    ids = [d["headers"]["webhook-id"] for d in receiver.got]
    assert len(ids) == len(set(ids)) + 1  # the one 500 was retried under the same id
    assert set(ids) == {f"msg_{i}" for i in secrets}
    assert 'promptserve_webhooks{outcome="delivered"}' in metrics
