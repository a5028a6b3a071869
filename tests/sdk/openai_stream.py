"""Streams a chat completion with the official OpenAI SDK.

Usage: openai_stream.py BASE_URL [MODEL ...]   (BASE_URL like http://127.0.0.1:PORT/v1)

Prints each chunk the SDK yields as a JSON line; on an exception prints
`ERROR <ExceptionClass> <message>` and exits 3 (details in common.py).
"""
import sys

from common import main


def make_client(openai, base_url):
    # A dummy key, no retries: every request goes to BASE_URL once.
    return openai.OpenAI(base_url=base_url, api_key="sk-test-not-a-real-key", max_retries=0, timeout=20.0)


def stream(client, model):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
    )


if __name__ == "__main__":
    sys.exit(main("openai", "gpt-test", make_client, stream))
