"""/static/ai-sdk.d.ts against the real `ai` and `@ai-sdk/react` types: tests/js/typecheck.ts, a
use of the transport as an app writes it, compiles with TypeScript in strict mode."""

from __future__ import annotations

import subprocess
from pathlib import Path

JS = Path(__file__).resolve().parent / "js"


def test_typeDeclarations_compileAgainstTheAiPackage() -> None:
    tsc = JS / "node_modules" / ".bin" / "tsc"
    if not tsc.exists():
        raise AssertionError("the npm packages of tests/js are not installed: run `make test`")
    result = subprocess.run([str(tsc), "-p", str(JS / "tsconfig.json")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
