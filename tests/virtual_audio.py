"""A virtual microphone for tests: a private PulseAudio daemon whose default source we feed.

The capture path under test is the real one: PortAudio (through sounddevice) opens the ALSA
device "pulse", ALSA's pulse plugin talks to our daemon, and the daemon's default source is
the monitor of a null sink into which `play()` plays a wav with `paplay`. With the sink at 16 kHz mono float32 nothing is resampled or converted on the
way, so what the test plays arrives bit for bit. Two settings keep it so (both seen to fail
otherwise): the sink runs with `norewinds=1`, as a new player would else rewind it and some
already-captured samples would be lost from the monitor; and paplay keeps its default (large)
buffer, as a short one underruns on a busy machine and the sink fills the holes with silence.
The null sink delivers nothing to its monitor for the first second or so after a recorder
connects while nothing plays; tests wait for the first chunk before they play.

Debian/Ubuntu packages needed: libportaudio2 pulseaudio pulseaudio-utils libasound2-plugins.
`unavailable_reason()` says which piece is missing, for a pytest skip.

The daemon runs as whoever runs the tests (root in CI: PulseAudio warns but works), with its
own runtime/state folders and socket in a temporary folder, so it disturbs no other sound
server on the machine. Client autospawn is turned off, so a killed daemon stays dead.
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

APT_PACKAGES = "libportaudio2 pulseaudio pulseaudio-utils libasound2-plugins"
ALSA_DEVICE = "pulse"  # the ALSA PCM (and so PortAudio device) that talks to the daemon

_ENV_KEYS = ("PULSE_SERVER", "PULSE_CLIENTCONFIG", "PULSE_RUNTIME_PATH", "PULSE_STATE_PATH")


def _alsa_pulse_plugin_present() -> bool:
    roots = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"]
    return any(Path(r, "alsa-lib", "libasound_module_pcm_pulse.so").exists() for r in roots)


def unavailable_reason() -> str | None:
    """None when a virtual microphone can be made here, else a sentence saying what is missing."""
    missing = []
    if ctypes.util.find_library("portaudio") is None:
        missing.append("libportaudio2")
    for binary, package in (
        ("pulseaudio", "pulseaudio"),
        ("paplay", "pulseaudio-utils"),
        ("pactl", "pulseaudio-utils"),
    ):
        if shutil.which(binary) is None and package not in missing:
            missing.append(package)
    if not _alsa_pulse_plugin_present():
        missing.append("libasound2-plugins")
    if missing:
        return (
            f"a virtual microphone needs the system packages {' '.join(missing)} "
            f"(apt-get install -y {APT_PACKAGES})"
        )
    return None


def refresh_portaudio() -> None:
    """Make PortAudio enumerate devices again (it lists them once, when initialised)."""
    import sounddevice as sd

    sd._terminate()
    sd._initialize()


class VirtualMicrophone:
    """A PulseAudio daemon with one virtual microphone, for the lifetime of a `with` block.

    Inside the block this process's environment points libpulse at the daemon, and PortAudio
    has been re-initialised so that its "pulse" and "default" ALSA devices reach it.
    """

    def __init__(self, rate: int = 16000):
        self.rate = rate
        self.dir: Path | None = None
        self.process: subprocess.Popen | None = None
        self._saved_env: dict[str, str | None] = {}
        self._players: list[subprocess.Popen] = []

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> VirtualMicrophone:
        self.dir = Path(tempfile.mkdtemp(prefix="virtual-mic-"))
        socket = self.dir / "native"
        (self.dir / "run").mkdir()
        (self.dir / "state").mkdir()
        client_conf = self.dir / "client.conf"
        client_conf.write_text("autospawn = no\n")
        env = {
            "PULSE_SERVER": f"unix:{socket}",
            "PULSE_CLIENTCONFIG": str(client_conf),
            "PULSE_RUNTIME_PATH": str(self.dir / "run"),
            "PULSE_STATE_PATH": str(self.dir / "state"),
        }
        daemon_env = {**os.environ, **env, "HOME": str(self.dir), "XDG_RUNTIME_DIR": str(self.dir / "run")}
        spec = f"format=float32le rate={self.rate} channels=1"
        log = open(self.dir / "daemon.log", "wb")
        self.process = subprocess.Popen(
            [
                "pulseaudio",
                "-n",
                "--daemonize=no",
                "--exit-idle-time=-1",
                "--use-pid-file=no",
                "--disable-shm=yes",
                "--log-target=stderr",
                "--log-level=error",
                "-L",
                f"module-native-protocol-unix socket={socket} auth-anonymous=1",
                "-L",
                f"module-null-sink sink_name=virtmic norewinds=1 {spec}",
            ],
            env=daemon_env,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        log.close()  # the daemon keeps its own copy
        self._saved_env = {k: os.environ.get(k) for k in _ENV_KEYS}
        os.environ.update(env)
        try:
            self._wait_until_ready()
            self._pactl("set-default-source", "virtmic.monitor")
            self._pactl("set-default-sink", "virtmic")
        except Exception:
            self.stop()
            raise
        refresh_portaudio()
        return self

    def _wait_until_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pulseaudio exited at start: {self.log()}")
            ok = (
                subprocess.run(["pactl", "info"], capture_output=True, env=os.environ, timeout=5).returncode
                == 0
            )
            if ok:
                return
            time.sleep(0.05)
        raise RuntimeError(f"pulseaudio did not answer within {timeout} s: {self.log()}")

    def log(self, name: str = "daemon.log") -> str:
        path = self.dir / name if self.dir else None
        return path.read_text(errors="replace")[-2000:] if path and path.exists() else ""

    def _pactl(self, *args: str) -> None:
        subprocess.run(["pactl", *args], check=True, capture_output=True, timeout=10)

    def kill(self) -> None:
        """Kill the daemon at once, as if the microphone were unplugged."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        for player in self._players:
            if player.poll() is None:
                player.kill()
            player.wait(timeout=10)
        self._players = []
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = {}
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        try:
            refresh_portaudio()
        except Exception:  # PortAudio missing: nothing to refresh
            pass

    def __enter__(self) -> VirtualMicrophone:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- feeding --------------------------------------------------------------------------

    def play(self, samples: np.ndarray) -> subprocess.Popen:
        """Start playing 16 kHz mono float samples into the microphone; returns the paplay process."""
        import soundfile as sf

        path = self.dir / f"feed-{time.monotonic_ns()}.wav"
        sf.write(str(path), np.asarray(samples, dtype=np.float32), self.rate, subtype="FLOAT")
        with open(self.dir / "paplay.log", "ab") as log:
            player = subprocess.Popen(
                ["paplay", "--device=virtmic", str(path)], stdout=subprocess.DEVNULL, stderr=log
            )
        self._players.append(player)
        return player


def speech(text: str, rate: int = 16000, voice: str = "en") -> np.ndarray:
    """`text` spoken by espeak-ng, as float32 mono at `rate` (raises if espeak-ng is missing)."""
    import soundfile as sf
    import soxr

    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "speech.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
        x, r = sf.read(str(path), dtype="float32")
    if x.ndim == 2:
        x = x.mean(axis=1)
    return soxr.resample(x, r, rate).astype(np.float32) if r != rate else x.astype(np.float32)


def assert_inside_the_pauses(found, spans, tolerance: float = 0.05) -> None:
    """Each found utterance (with .start/.end in seconds) starts and ends within the pauses
    around its spoken span: after the previous span, before the next one."""
    assert len(found) == len(spans), [(u.start, u.end) for u in found]
    for i, (u, (a, b)) in enumerate(zip(found, spans)):
        previous_end = spans[i - 1][1] if i else 0.0
        next_start = spans[i + 1][0] if i + 1 < len(spans) else np.inf
        assert previous_end < u.start <= a + tolerance, f"utterance {i} starts at {u.start:.2f}, speech at {a:.2f}"
        assert b - tolerance <= u.end < next_start, f"utterance {i} ends at {u.end:.2f}, speech at {b:.2f}"
