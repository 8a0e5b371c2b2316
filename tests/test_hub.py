"""Hub uploads (diffusability_hf.hub and the scripts' --push_to_hub) against a local HTTP server that records what it
receives: the repo creation request, the uploaded file set and bytes, and where the token travels.

The client runs in a subprocess with ``HF_ENDPOINT`` pointing at the server and ``HF_HUB_OFFLINE=0``:
huggingface_hub reads its settings at import time, and this suite sets ``HF_HUB_OFFLINE=1`` in-process (conftest).
"""

import base64
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from testing_utils import ACCELERATE_CPU

TOKEN = "hf_TESTTOKENneverWriteMe0123456789abcdef"
REPO = "someone/tiny-se"


class RecordingHub:
    """Just enough of the Hub API for ``create_repo`` + ``upload_folder`` (huggingface_hub 2.x):

    - ``POST /api/repos/create`` -> ``{"url": ...}``
    - ``POST /api/validate-yaml`` (README metadata check) -> no errors
    - ``POST /api/models/{repo}/preupload/{rev}`` -> ``uploadMode: "regular"`` for every file, so contents travel
      base64-encoded inside the commit payload (no LFS / xet transfer to emulate)
    - ``POST /api/models/{repo}/commit/{rev}`` (NDJSON) -> ``{"commitOid", "commitUrl"}``
    - ``GET /api/models/{repo}`` (repo_info, used by create_repo after a 401/403) -> 404

    Anything else gets a 404 and is recorded as kind ``"other"``. ``status[kind] = code`` makes that endpoint fail.
    """

    ROUTES = [
        ("POST", re.compile(r"^/api/repos/create$"), "create"),
        ("POST", re.compile(r"^/api/validate-yaml$"), "validate-yaml"),
        ("POST", re.compile(r"^/api/models/[^/]+/[^/]+/preupload/[^/]+$"), "preupload"),
        ("POST", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/[^/]+$"), "commit"),
        ("GET", re.compile(r"^/api/models/[^/]+/[^/]+(/revision/.*)?$"), "repo_info"),
    ]

    def __init__(self):
        self.requests = []
        self.status = {}
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer has a Content-Length

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub._handle(self)

            do_POST = do_PUT = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def _read_body(handler):
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(handler.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    handler.rfile.readline()
                    return data
                data += handler.rfile.read(size)
                handler.rfile.readline()
        return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))

    def _handle(self, handler):
        body = self._read_body(handler)
        path = urlsplit(handler.path).path
        kind, match = "other", None
        for method, pattern, name in self.ROUTES:
            match = pattern.match(path) if handler.command == method else None
            if match:
                kind = name
                break
        with self._lock:
            self.requests.append(
                dict(kind=kind, method=handler.command, path=handler.path, headers=list(handler.headers.items()),
                     body=body)
            )  # fmt: skip
        code, answer = 200, {}
        if kind in self.status:
            code, answer = self.status[kind], {"error": f"mock hub: {kind} refused"}
        elif kind == "create":
            payload = json.loads(body)
            repo_id = (
                f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            )
            answer = {"url": f"{self.url}/{repo_id}", "name": repo_id}
        elif kind == "validate-yaml":
            answer = {"errors": [], "warnings": []}
        elif kind == "preupload":
            files = json.loads(body)["files"]
            answer = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        elif kind == "commit":
            oid = f"{len(self.requests):040x}"
            answer = {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{match['repo']}/commit/{oid}"}
        else:
            code, answer = 404, {"error": "mock hub: not found"}
        data = json.dumps(answer).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        if code == 404:
            handler.send_header("X-Error-Code", "RepoNotFound")
        handler.end_headers()
        handler.wfile.write(data)

    def of_kind(self, kind):
        return [r for r in self.requests if r["kind"] == kind]

    def committed_files(self):
        """``{path: bytes}`` decoded from the NDJSON commit payloads (regular files travel base64-encoded)."""
        files = {}
        for request in self.of_kind("commit"):
            for line in request["body"].splitlines():
                item = json.loads(line)
                assert item["key"] in ("header", "file"), item["key"]  # no LFS pointers, no deletions
                if item["key"] == "file":
                    assert item["value"]["encoding"] == "base64"
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return files

    def created_private(self):
        """The visibility asked for at creation: ``visibility`` in huggingface_hub 2.x, ``private`` before."""
        (request,) = self.of_kind("create")
        payload = json.loads(request["body"])
        if "visibility" in payload:
            return {"private": True, "public": False}[payload["visibility"]]
        return payload.get("private")


@pytest.fixture
def hub():
    server = RecordingHub()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def hub_env(hub, tmp_path, **extra):
    """Online, against the mock; a private HF_HOME (so a token written there would be found, and no stored token of
    the machine's is used); no proxy for the loopback address."""
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "HF_TOKEN": TOKEN,  # how the scripts get a token: never on their command line
        **extra,
    }


# With hf_xet installed, upload_folder takes the pipelined path, whose commit POST is retried with backoff on a 5xx
# (~25 s of waiting before the error). HF_HUB_DISABLE_XET=1 selects the single create_commit path, which fails on the
# first 500: used where a failing commit is tested, to keep the suite fast. Successful uploads are tested both ways.
NO_XET = {"HF_HUB_DISABLE_XET": "1"}


def tree(folder):
    """``{relative posix path: bytes}`` of every file under ``folder``."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder).replace(os.sep, "/")] = f.read()
    return out


def without_checkpoints_and_logs(files):
    return {p: b for p, b in files.items() if not (p.startswith("checkpoint-") or p.startswith("logs/"))}


def assert_token_only_in_auth_headers(hub, token=TOKEN):
    assert hub.requests
    for request in hub.requests:
        assert token not in request["path"]
        assert token.encode() not in request["body"], f"token in the body of {request['method']} {request['path']}"
        for name, value in request["headers"]:
            if token in value:
                assert name.lower() == "authorization", f"token in header {name}"
        auth = [v for k, v in request["headers"] if k.lower() == "authorization"]
        assert auth == [f"Bearer {token}"], f"{request['path']}: {auth}"
    for path, content in hub.committed_files().items():  # uploaded contents travel base64-encoded
        assert token.encode() not in content, f"token inside uploaded {path}"


def assert_token_in_no_file(*folders, token=TOKEN):
    for folder in folders:
        for path, content in tree(folder).items():
            assert token.encode() not in content, f"token written to {os.path.join(folder, path)}"


CLIENT = r"""
import json, sys
from diffusability_hf.hub import check_hub_access, push_folder
repo_id, token, private, folder = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
try:
    repo = check_hub_access(repo_id, token, private)
    url = push_folder(repo, folder, token, "test upload")
except RuntimeError as err:
    print(json.dumps({"error": str(err)}))
else:
    print(json.dumps({"repo": repo, "url": url}))
"""


def client(hub, tmp_path, folder, private=False, **extra):
    env = dict(os.environ, **hub_env(hub, tmp_path, **extra))
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(key, None)
    args = [sys.executable, "-c", CLIENT, REPO, TOKEN, "1" if private else "0", str(folder)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TOKEN not in proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def model_folder(tmp_path):
    """A saved-model-like folder with training leftovers that must not be uploaded."""
    root = tmp_path / "out"
    files = {
        "config.json": b'{"_class_name": "AutoencoderKL"}',
        "diffusion_pytorch_model.safetensors": bytes(range(256)) * 12 + b"\xff\x00\xfe",
        "README.md": b"---\nlibrary_name: diffusers\nlicense: mit\n---\n\n# Tiny model\n",
        "transformer/config.json": b"{}",
        "empty.txt": b"",
        "checkpoint-2/model.safetensors": b"\x01" * 100,
        "checkpoint-2/random_states_0.pkl": b"\x02" * 10,
        "logs/train_ae_se/events.out.tfevents.1": b"\x03" * 10,
    }
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return root


@pytest.mark.parametrize("private, extra", [(True, {}), (False, NO_XET)], ids=["private-pipelined", "public-commit"])
def test_push_folder_uploads_the_model_without_checkpoints_or_logs(hub, tmp_path, model_folder, private, extra):
    before = tree(model_folder)
    result = client(hub, tmp_path, model_folder, private=private, **extra)
    assert "error" not in result, result["error"]
    assert result["repo"] == REPO and result["url"].startswith(f"{hub.url}/{REPO}/commit/")
    assert not hub.of_kind("other"), [r["path"] for r in hub.of_kind("other")]

    assert hub.created_private() is private
    payload = json.loads(hub.of_kind("create")[0]["body"])
    assert (payload["organization"], payload["name"]) == tuple(REPO.split("/"))
    (commit,) = hub.of_kind("commit")
    assert f"/api/models/{REPO}/commit/main" in commit["path"]
    assert json.loads(commit["body"].splitlines()[0])["value"]["summary"] == "test upload"

    uploaded = hub.committed_files()
    assert uploaded == without_checkpoints_and_logs(before)  # same paths, same bytes
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", "empty.txt"} <= set(uploaded)
    assert tree(model_folder) == before  # the local folder is left as it was

    assert_token_only_in_auth_headers(hub)
    assert_token_in_no_file(model_folder, tmp_path / "hf_home")


def test_push_folder_failure_keeps_the_folder_and_says_how_to_retry(hub, tmp_path, model_folder):
    before = tree(model_folder)
    hub.status["commit"] = 500
    result = client(hub, tmp_path, model_folder, **NO_XET)
    message = result.get("error", "")
    assert f"everything is still in {model_folder}" in message
    assert f"hf upload {REPO} {model_folder}" in message
    assert TOKEN not in message
    assert hub.of_kind("commit") and tree(model_folder) == before


def test_unreachable_repo_fails_up_front(hub, tmp_path, model_folder):
    # Creation refused (403) and the repo not readable either: nothing gets uploaded
    hub.status["create"] = 403
    result = client(hub, tmp_path, model_folder)
    assert f"Could not create or reach the Hub repo '{REPO}'" in result.get("error", ""), result
    assert TOKEN not in result["error"]
    assert not hub.of_kind("preupload") and not hub.of_kind("commit")


def test_offline_refuses_before_any_request(hub, tmp_path, model_folder):
    # (The scripts' offline refusal before training is tested in test_train_ae_se.py and test_train_dit_flow.py.)
    result = client(hub, tmp_path, model_folder, HF_HUB_OFFLINE="1")
    assert "HF_HUB_OFFLINE=1" in result.get("error", "") and "hf upload" in result["error"], result
    assert hub.requests == []


# --- End to end, through `accelerate launch` ---------------------------------------------------------------------

AE_ARGS = ["--resolution", 32, "--train_batch_size", 2, "--validation_steps", 2, "--num_validation_images", 2,
           "--learning_rate", 1e-3, "--max_train_steps", 2]  # fmt: skip
PUSH = ["--push_to_hub", "--hub_model_id", REPO]  # the token comes from HF_TOKEN (see hub_env)


def train_ae(run_script, hub, tmp_path, vae_dir, out, *extra, check=True, env=None):
    args = ["--pretrained_model_name_or_path", vae_dir, "--output_dir", out, *AE_ARGS]
    args += ["--lpips_trunk_path", os.path.join(vae_dir, "alexnet_trunk.pth"), *extra]
    return run_script(
        "train_ae_se.py", args, check=check, launcher=ACCELERATE_CPU, extra_env=hub_env(hub, tmp_path, **(env or {}))
    )


def test_train_ae_se_pushes_model_and_card_but_never_the_token(hub, tmp_path, tiny_vae_dir, run_script):
    out = tmp_path / "se"
    # Tensorboard on and checkpoints every step: the run config and leftovers the upload must skip
    proc = train_ae(
        run_script, hub, tmp_path, tiny_vae_dir, out, "--report_to", "tensorboard", "--checkpointing_steps", 1,
        *PUSH, "--private",
    )  # fmt: skip
    local = tree(out)
    assert any(p.startswith("checkpoint-1/") for p in local) and any(p.startswith("logs/") for p in local)

    assert hub.created_private() is True
    assert not hub.of_kind("other"), [r["path"] for r in hub.of_kind("other")]
    uploaded = hub.committed_files()
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= set(uploaded)
    assert not [p for p in uploaded if p.startswith(("checkpoint-", "logs/")) or "tfevents" in p]
    assert uploaded == without_checkpoints_and_logs(local)
    card = uploaded["README.md"].decode()
    assert card.startswith("---\n") and "library_name: diffusers" in card

    assert TOKEN not in proc.stdout + proc.stderr
    assert TOKEN not in card and "hub_token" not in card
    assert_token_only_in_auth_headers(hub)
    assert_token_in_no_file(out, tmp_path / "hf_home")


def test_train_ae_se_failed_upload_keeps_the_model(hub, tmp_path, tiny_vae_dir, run_script):
    out = tmp_path / "se"
    hub.status["commit"] = 500
    proc = train_ae(
        run_script, hub, tmp_path, tiny_vae_dir, out, "--report_to", "none", "--max_train_steps", 1, *PUSH,
        check=False, env=NO_XET,
    )  # fmt: skip
    assert proc.returncode != 0
    assert hub.of_kind("commit"), "training should have finished and the upload been tried"
    assert f"everything is still in {out}" in proc.stderr and f"hf upload {REPO} {out}" in proc.stderr
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "README.md"):
        assert (out / name).is_file(), name
    assert_token_in_no_file(out, tmp_path / "hf_home")

    # A failing script makes `accelerate launch` print its whole command line: the token is not on it
    assert "CalledProcessError" in proc.stderr and TOKEN not in proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["train_ae_se.py", "train_dit_flow.py"])
def test_a_token_on_the_command_line_is_refused(tmp_path, run_script, script):
    proc = run_script(script, ["--output_dir", tmp_path / "out", "--hub_token", TOKEN], check=False)
    assert proc.returncode != 0 and "--hub_token is refused" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_train_dit_flow_pushes_the_pipeline_but_never_the_token(hub, tmp_path, tiny_vae_dir, run_script):
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for name in ("cats", "dogs"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            arr = (torch.rand(16, 16, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / "data" / name / f"{i}.png")
    out = tmp_path / "dit"
    args = ["--train_data_dir", tmp_path / "data", "--pretrained_vae_model_name_or_path", tiny_vae_dir,
            "--resolution", 16, "--stats_batches", 1, "--model", "DiT-tiny/2", "--train_batch_size", 4,
            "--max_train_steps", 2, "--checkpointing_steps", 1, "--num_inference_steps", 2, "--validation_steps", 2,
            "--report_to", "tensorboard", "--output_dir", out, *PUSH]  # fmt: skip
    proc = run_script("train_dit_flow.py", args, launcher=ACCELERATE_CPU, extra_env=hub_env(hub, tmp_path))
    local = tree(out)
    assert any(p.startswith("checkpoint-1/") for p in local) and any(p.startswith("logs/") for p in local)

    assert hub.created_private() is False
    assert not hub.of_kind("other"), [r["path"] for r in hub.of_kind("other")]
    uploaded = hub.committed_files()
    expected = {"model_index.json", "pipeline.py", "README.md", "transformer/config.json", "vae/config.json"}
    assert expected | {"transformer/diffusion_pytorch_model.safetensors"} <= set(uploaded)
    assert uploaded == without_checkpoints_and_logs(local)

    assert TOKEN not in proc.stdout + proc.stderr
    assert TOKEN not in uploaded["README.md"].decode()
    assert_token_only_in_auth_headers(hub)
    assert_token_in_no_file(out, tmp_path / "hf_home")
