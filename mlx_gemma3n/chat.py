"""Chat with Gemma 3n in the terminal.

    python -m mlx_gemma3n.chat --model google/gemma-3n-E2B-it

Replies stream as they are generated; Ctrl-C stops a reply (the conversation goes on),
Ctrl-D leaves. Type /help for the commands.
"""

from __future__ import annotations

import argparse
import signal
import sys

from .generate import ChatSession, add_sampling_args, load_from_args, sampling_from_args

HELP = """Commands:
  /image PATH     attach an image (file or URL) to your next message
  /video PATH     attach frames of a video, a GIF or a folder of frames (1 per second, at most 8)
  /audio PATH     attach a recording (WAV, FLAC, OGG, MP3, ...) to your next message
  /help           this text
  /reset          forget the conversation
  /speed          show or hide tokens/s after each reply
  /quit           leave (Ctrl-D works too)
Ctrl-C stops a reply; the conversation keeps what was said."""


class Chat:
    def __init__(self, session: ChatSession, max_tokens: int, show_speed: bool = False, out=sys.stdout):
        self.session, self.max_tokens, self.show_speed, self.out = session, max_tokens, show_speed, out
        self.images, self.audio = [], []  # attachments waiting for the next message

    def attach(self, kind: str, path: str) -> None:
        from .processing.audio import load_audio
        from .processing.image import load_image
        from .processing.video import load_video_frames

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
        except ValueError as e:  # each processing error is one sentence for a person
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
        elif name == "speed":
            self.show_speed = not self.show_speed
            self.say(f"[speed {'shown' if self.show_speed else 'hidden'}]")
        else:
            self.say(f"Unknown command /{name}: type /help for the list.")
        return True

    def reply(self, text: str) -> None:
        images, audio = self.images, self.audio
        self.images, self.audio = [], []
        responses = self.session.send(text, max_tokens=self.max_tokens, images=images, audio=audio)
        last = None
        try:
            for last in responses:
                self.say(last.text, end="")
            self.say()
        except KeyboardInterrupt:
            responses.close()
            self.say("\n[stopped]")
        except ValueError as e:  # e.g. a prompt over the context
            self.say(f"error: {e}")
            return
        if self.show_speed and last is not None:
            self.say(
                f"[prompt {self.session.last_prefill} tokens at {last.prompt_tps:.1f} tok/s, "
                f"reply {last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s, "
                f"peak memory {last.peak_memory:.2f} GB]"
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_gemma3n.chat", description="Chat with Gemma 3n.")
    add_sampling_args(parser)
    parser.set_defaults(max_tokens=1024)
    parser.add_argument("--speed", action="store_true", help="show tokens/s after each reply")
    args = parser.parse_args(argv)
    # Ctrl-C stops a reply: make sure it arrives even when a launcher started us with SIGINT
    # ignored (as shells do for background jobs), which Python would otherwise keep.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        model, tokenizer = load_from_args(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    session = ChatSession(model, tokenizer, system=args.system, sampling=sampling_from_args(args))
    Chat(session, args.max_tokens, args.speed).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
