"""Streams a message with the official Anthropic SDK.

Usage: anthropic_stream.py BASE_URL [MODEL ...]   (BASE_URL like http://127.0.0.1:PORT)

Prints each event the SDK yields as a JSON line; on an exception prints
`ERROR <ExceptionClass> <message>` and exits 3 (details in common.py).
"""
import sys

from common import main


def make_client(anthropic, base_url):
    # A dummy key, no retries: every request goes to BASE_URL once.
    return anthropic.Anthropic(base_url=base_url, api_key="sk-ant-test-not-a-real-key", max_retries=0, timeout=20.0)


def stream(client, model):
    return client.messages.create(
        model=model,
        max_tokens=64,
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
    )


if __name__ == "__main__":
    sys.exit(main("anthropic", "claude-test", make_client, stream))
