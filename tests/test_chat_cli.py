"""The chat's input line under a real terminal: arrow keys edit the line and recall earlier ones."""

from __future__ import annotations

import os
import sys

import pexpect

LEFT, UP = "\x1b[D", "\x1b[A"


def test_arrow_keys_edit_the_line_and_recall_the_previous_one(tiny):
    child = pexpect.spawn(
        sys.executable, ["-m", "mlx_gemma3n.chat", "--model", str(tiny[0]), "--temp", "0", "--max-tokens", "2"],
        env=dict(os.environ, PYTHONUNBUFFERED="1", TERM="xterm"), encoding="utf-8", timeout=120,
    )
    try:
        child.expect(">> ")
        # A missing image's error names the path exactly as the chat received it.
        child.send("/image /nonexistent/abc" + LEFT * 2 + "X\r")
        child.expect(r"error: Image file not found: (\S+)\.\r?\n")
        assert child.match.group(1) == "/nonexistent/aXbc"
        seen = child.before
        child.expect(">> ")
        child.send(UP + "\r")
        child.expect(r"error: Image file not found: (\S+)\.\r?\n")
        assert child.match.group(1) == "/nonexistent/aXbc"
        seen += child.before
        child.expect(">> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert "^[[" not in seen  # the terminal did not echo the arrow keys as text
    assert child.exitstatus == 0
