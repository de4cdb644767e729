"""A llama.cpp child process that answers one JSON object per line: llama.cpp aborts its whole process on a
failed internal check, so it runs apart, and a child that stops is explained by its own error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..core.errors import MoesiftError


class LlamaChild:
    """`python argv...` with stdin/stdout as JSON lines and stderr in `err_path`; `what` names what it runs in
    the error line of a child that stopped."""

    def __init__(self, argv: list[str], err_path: Path, what: str) -> None:
        self.what, self.err_path = what, err_path
        self.err = err_path.open("w")
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, env=env)

    def read(self) -> dict[str, Any]:
        """The child's next answer; one error line (llama.cpp's own, from its stderr) when it stopped."""
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.proc.wait()
            self.err.flush()
            lines = [x for x in self.err_path.read_text(errors="replace").splitlines() if x.strip()]
            why = next((x for x in lines if "GGML_ASSERT" in x or "error" in x.lower()), lines[-1] if lines else "")
            self.close()
            raise MoesiftError(f"llama.cpp stopped (exit code {self.proc.returncode}) running {self.what}: "
                               f"{' '.join(why.split())[:300]}")
        return json.loads(line)

    def send(self, req: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child died; read() says why

    def close(self) -> None:
        """End the child (closing its stdin ends its loop), and remove its stderr file."""
        if self.proc.poll() is None:
            if self.proc.stdin:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.err.closed:
            self.err.close()
        self.err_path.unlink(missing_ok=True)
