"""Shared driver and output format for the SDK stream scripts.

Usage: <script> BASE_URL [MODEL ...]

For each MODEL (one request each, in order), stdout gets one JSON line per
item the SDK yields and, if the SDK raised, `ERROR <ExceptionClass>
<message>`. With more than one MODEL each one's output starts with a line
`=== MODEL`. The exit code is 3 if any request raised, else 0 (4: the SDK
cannot be imported). On an exception stderr gets one JSON line with the
model, the exception's class hierarchy, `body` and `status_code`, so the
Rust test can tell which error the SDK raised without parsing the message.
"""
import json
import sys

IMPORT_FAILED = 4
RAISED = 3


def emit(item) -> None:
    """Prints one yielded item as a JSON line (model type and content)."""
    line = {"type": type(item).__name__, "item": item.to_dict()}
    print(json.dumps(line, sort_keys=True, ensure_ascii=False), flush=True)


def report(model: str, exc: BaseException) -> None:
    """Prints the ERROR line and the details."""
    message = " ".join(str(exc).split())
    print(f"ERROR {type(exc).__name__} {message}", flush=True)
    details = {
        "model": model,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "body": getattr(exc, "body", None),
        "status_code": getattr(exc, "status_code", None),
    }
    print(json.dumps(details, default=str), file=sys.stderr, flush=True)


def main(sdk: str, default_model: str, make_client, stream) -> int:
    """Imports `sdk`, builds a client for argv's BASE_URL and streams each
    model with `stream(client, model)`, which yields the SDK's items."""
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    base_url, models = sys.argv[1], sys.argv[2:] or [default_model]
    try:
        module = __import__(sdk)
    except ImportError as exc:
        print(f"IMPORT_ERROR {sdk}: {exc}", flush=True)
        return IMPORT_FAILED
    client = make_client(module, base_url)
    code = 0
    for model in models:
        if len(models) > 1:
            print(f"=== {model}", flush=True)
        try:
            for item in stream(client, model):
                emit(item)
        except Exception as exc:  # noqa: BLE001 - the test wants whatever the SDK raises
            report(model, exc)
            code = RAISED
    return code
