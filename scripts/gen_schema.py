"""Generate protocol/schema/ from the pydantic models in wsserver.messages.

    python scripts/gen_schema.py          # rewrite the schema files
    python scripts/gen_schema.py --check  # exit 1 if they are stale

One JSON Schema per direction (client.json: what a client may send;
server.json: what a server sends), each a discriminated union on ``type``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import TypeAdapter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wsserver.wire.messages import ClientMessage, ServerMessage  # noqa: E402

SCHEMA_DIR = ROOT / "protocol" / "schema"


def render() -> dict[str, str]:
    out = {}
    for name, union, title, mode in (
        ("client.json", ClientMessage, "wsserver protocol v1: client to server", "validation"),
        ("server.json", ServerMessage, "wsserver protocol v1: server to client", "serialization"),
    ):
        schema = TypeAdapter(union).json_schema(mode=mode, by_alias=True)
        for definition in schema["$defs"].values():
            # `type` has a default in the server models (so code need not pass
            # it) but is always on the wire: the schema must require it.
            if "const" in definition.get("properties", {}).get("type", {}):
                required = definition.setdefault("required", [])
                if "type" not in required:
                    required.insert(0, "type")
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title, **schema}
        out[name] = json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = SCHEMA_DIR / name
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(
            f"protocol/schema is stale ({', '.join(stale)}): run python scripts/gen_schema.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
