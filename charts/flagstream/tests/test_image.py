"""The container image: built by scripts/image.sh with buildah, inspected, and
run from its own root filesystem. flagread, started with an upstream given as a
host name (`http://localhost:<port>`), must sync from the image's flagwrite, and
the image's `healthcheck` must report SERVING for both."""

import json
import os
import shutil
import subprocess
import tarfile
import time

import pytest

from conftest import CRATE_VERSION, ROOT, free_port, missing

IMAGE = f"localhost/flagstream:{CRATE_VERSION}"
BUILDAH = ["buildah", "--storage-driver", "vfs"]


def buildah(*args, **kw) -> str:
    return subprocess.run([*BUILDAH, *args], check=True, capture_output=True, text=True, **kw).stdout.strip()


def build(archive=None) -> str:
    env = os.environ.copy()
    # The binaries the rest of the suite uses (scripts/test.sh builds them once).
    built = ROOT / "target" / env.get("IMAGE_PROFILE", "release")
    if (built / "flagread").is_file() and (built / "flagwrite").is_file():
        env.setdefault("IMAGE_SKIP_CARGO", "1")
    args = [str(ROOT / "scripts" / "image.sh")] + (["--oci-archive", str(archive)] if archive else [])
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    if not shutil.which("buildah"):
        missing("buildah (apt-get install buildah)")
    archive = tmp_path_factory.mktemp("image") / "flagstream.oci.tar"
    image_id = build(archive)
    return {"id": image_id, "archive": archive}


@pytest.fixture(scope="module")
def container(image):
    name = buildah("from", "--pull=never", IMAGE)
    mount = buildah("mount", name)
    yield name, mount
    subprocess.run([*BUILDAH, "umount", name], capture_output=True)
    subprocess.run([*BUILDAH, "rm", name], capture_output=True)


def test_same_inputs_give_the_same_image(image):
    assert build() == image["id"]


def test_config_user_entrypoint_and_labels(image):
    info = json.loads(buildah("inspect", "--type", "image", IMAGE))
    config = info["OCIv1"]["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["/usr/local/bin/flagread"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == CRATE_VERSION
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.title"] == "flagstream"
    for key in ("description", "revision", "source"):
        assert labels[f"org.opencontainers.image.{key}"], key
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert labels["org.opencontainers.image.revision"] == revision


def test_oci_archive(image):
    with tarfile.open(image["archive"]) as archive:
        names = archive.getnames()
    assert "index.json" in names and "oci-layout" in names


def test_rootfs_has_both_binaries_and_no_shell(container):
    _, root = container
    files = sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )
    assert "usr/local/bin/flagwrite" in files and "usr/local/bin/flagread" in files
    for banned in ("sh", "bash", "dash", "busybox", "apt", "apt-get", "dpkg"):
        assert not [f for f in files if os.path.basename(f) == banned], banned
    assert {"etc/passwd", "etc/group", "etc/nsswitch.conf"} <= set(files)
    assert "nonroot:x:65532:65532:" in open(os.path.join(root, "etc/passwd")).read()
    # Nothing but the binaries, their libraries and a few files in /etc.
    others = [f for f in files if not f.startswith(("usr/local/bin/", "lib", "usr/lib", "etc/"))]
    assert not others, others


def test_binaries_run_from_the_image(container, tmp_path):
    name, _ = container
    write_port, read_port = free_port(), free_port()
    run = [*BUILDAH, "run", "--isolation", "chroot", "--network", "host", "--user", "65532:65532", name, "--"]
    processes = []
    try:
        processes.append(subprocess.Popen(
            [*run, "/usr/local/bin/flagwrite", "--dev-no-auth", "--listen", f"127.0.0.1:{write_port}",
             "--metrics-listen", f"127.0.0.1:{free_port()}", "--data-dir", "/tmp/flagwrite"],
            stdout=open(tmp_path / "flagwrite.log", "wb"), stderr=subprocess.STDOUT))
        processes.append(subprocess.Popen(
            [*run, "/usr/local/bin/flagread", "--dev-no-auth", "--listen", f"127.0.0.1:{read_port}",
             "--metrics-listen", f"127.0.0.1:{free_port()}", "--ofrep-listen", f"127.0.0.1:{free_port()}",
             "--upstream", f"http://localhost:{write_port}",
             "--backoff-max-ms", "300"],
            stdout=open(tmp_path / "flagread.log", "wb"), stderr=subprocess.STDOUT))

        def healthcheck(binary, port):
            done = subprocess.run([*run, f"/usr/local/bin/{binary}", "healthcheck", "--addr", f"127.0.0.1:{port}"],
                                  capture_output=True, text=True, timeout=30)
            return done.returncode == 0 and done.stdout.strip() == "SERVING"

        deadline = time.monotonic() + 60
        while not (healthcheck("flagwrite", write_port) and healthcheck("flagread", read_port)):
            assert time.monotonic() < deadline, (
                (tmp_path / "flagwrite.log").read_text()[-2000:] + (tmp_path / "flagread.log").read_text()[-2000:]
            )
            time.sleep(0.5)
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
