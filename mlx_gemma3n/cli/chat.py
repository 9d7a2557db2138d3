"""Chat with Gemma 3n in the terminal.

    python -m mlx_gemma3n.chat --model google/gemma-3n-E2B-it

Replies stream as they are generated; Ctrl-C stops a reply (the conversation goes on),
Ctrl-D leaves. Type /help for the commands. Lines can be edited and recalled with the arrow
keys (readline, where Python has it).
"""

from __future__ import annotations

import signal
import sys

from ..errors import Gemma3nError
from .common import (
    add_context_args, add_model_args, add_sampling_args, command, load_from_args, parser, sampling_from_args, say_progress,
)

HELP = """Commands:
  /image PATH     attach an image (file or URL) to your next message
  /video PATH     attach frames of a video, a GIF or a folder of frames (1 per second, at most 8)
  /audio PATH     attach a recording (WAV, FLAC, OGG, MP3, ...) to your next message
  /help           this text
  /reset          forget the conversation
  /size [NAME]    show the MatFormer size, or switch to a preset (E2B, E2.54B, ...; "full" for the whole model);
                  the conversation goes on, recomputed at the new size with your next message
  /speed          show or hide tokens/s after each reply
  /quit           leave (Ctrl-D works too)
Ctrl-C stops a reply; the conversation keeps what was said."""


class Chat:
    def __init__(self, session, max_tokens: int, show_speed: bool = False, out=sys.stdout):
        self.session, self.max_tokens, self.show_speed, self.out = session, max_tokens, show_speed, out
        self.images, self.audio = [], []  # attachments waiting for the next message

    def attach(self, kind: str, path: str) -> None:
        from ..processing.audio import load_audio
        from ..processing.image import load_image
        from ..processing.video import load_video_frames

        if not path:
            self.say(f"Give a path: /{kind} PATH")
            return
        try:
            if kind == "image":
                self.images.append(load_image(path))
            elif kind == "video":
                frames = load_video_frames(path, fps=1.0, max_frames=8)
                self.images += [image for _, image in frames]
                self.say(f"[{len(frames)} frames at {', '.join(f'{t:.1f}' for t, _ in frames)} s]")
            else:
                self.audio.append(load_audio(path))
        except Gemma3nError as e:  # each processing error is one sentence for a person
            self.say(f"error: {e}")
            return
        self.say(f"[attached {kind} {path}; it goes with your next message]")

    def say(self, text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=self.out, flush=True)

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, argument = line[1:].partition(" ")
        if name in ("quit", "exit", "q"):
            return False
        if name in ("image", "video", "audio"):
            self.attach(name, argument.strip())
        elif name == "help":
            self.say(HELP)
        elif name == "reset":
            self.session.reset()
            self.images, self.audio = [], []
            self.say("[conversation cleared]")
        elif name == "size":
            self.size(argument.strip())
        elif name == "speed":
            self.show_speed = not self.show_speed
            self.say(f"[speed {'shown' if self.show_speed else 'hidden'}]")
        else:
            self.say(f"Unknown command /{name}: type /help for the list.")
        return True

    def size(self, name: str) -> None:
        if not name:
            plan = self.session.plan
            self.say(f"[size: {plan.name if plan else 'full'}]")
            return
        try:
            self.session.resize(None if name.lower() == "full" else name)
        except Gemma3nError as e:
            self.say(f"error: {e}")
            return
        self.say(f"[size: {name}; the conversation is recomputed at this size with your next message]")

    def reply(self, text: str) -> None:
        images, audio = self.images, self.audio
        self.images, self.audio = [], []
        last = None
        try:
            responses = self.session.send(text, max_tokens=self.max_tokens, images=images, audio=audio,
                                          progress=say_progress)
            try:
                for last in responses:
                    self.say(last.text, end="")
                self.say()
            except KeyboardInterrupt:
                responses.close()
                self.say("\n[stopped]")
        except KeyboardInterrupt:  # while the attachments or the prompt went in
            self.say("\n[stopped]")
            return
        except Gemma3nError as e:  # e.g. a prompt over the context: /reset makes room
            self.say(f"error: {e}" + (" (/reset starts a new conversation)" if "context" in str(e) else ""))
            return
        if last is not None and last.finish_reason == "length" and last.generation_tokens < self.max_tokens:
            self.say("[the reply reached the end of the model's context: /reset to start a new conversation]")
        if self.show_speed and last is not None:
            media = f"attachments {last.media_seconds:.1f} s in the towers, " if last.media_seconds else ""
            self.say(
                f"[prompt {self.session.last_prefill} tokens at {last.prompt_tps:.1f} tok/s, "
                f"reply {last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s, "
                f"{media}peak memory {last.peak_memory:.2f} GB]"
            )

    def run(self, read=input) -> None:
        self.say("Gemma 3n chat. /help for commands, Ctrl-D to leave.")
        while True:
            try:
                line = read(">> ").strip()
            except EOFError:
                self.say()
                return
            except KeyboardInterrupt:
                self.say()
                continue
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
            else:
                self.reply(line)


def enable_line_editing() -> None:
    """Arrow keys, history and Emacs-style editing in `input()`: importing readline is enough."""
    try:
        import readline  # noqa: F401
    except ImportError:  # e.g. Windows without pyreadline
        pass


@command
def main(argv=None) -> int:
    p = parser("python -m mlx_gemma3n.chat", "Chat with Gemma 3n.")
    add_model_args(p)
    add_sampling_args(p)
    add_context_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--speed", action="store_true", help="show tokens/s after each reply")
    args = p.parse_args(argv)
    sampling = sampling_from_args(args)
    # Ctrl-C stops a reply: make sure it arrives even when a launcher started us with SIGINT
    # ignored (as shells do for background jobs), which Python would otherwise keep.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        from ..runtime.session import ChatSession

        model, tokenizer = load_from_args(args)
        enable_line_editing()
        session = ChatSession(model, tokenizer, system=args.system, sampling=sampling, submodel=args.submodel,
                              kv_bits=args.kv_bits)
        Chat(session, args.max_tokens, args.speed).run()
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0
