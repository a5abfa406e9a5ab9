"""Where block weights live while a run works on one block at a time: `offload=none|cpu|disk`.

A model larger than the device keeps its blocks on the host (`cpu`) or on disk, memory-mapped from
safetensors (`disk`), and moves each block to the device in turn; everything outside the blocks
(embeddings, final norm, head) stays on the device. A pruned block is written back as it finishes:
to the host, or (disk) to a safetensors file of its own in the offload folder, whose index then
points at the pruned weights. Evaluation of an offloaded model goes through accelerate's
`dispatch_model` with the same index, so the weights are never loaded whole.

Each mode is one `BlockStore` class: how it opens the model, moves blocks, and what it holds
(`footprint`, which the planner adds up). `STORES` lists them by mode.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from stat_exp.errors import UserError
from stat_exp.execution.sizes import Footprint, Sizes
from stat_exp.models import AdapterFactory, get_adapter
from stat_exp.models.base import ModelAdapter
from stat_exp.models.checkpoint import load_model, model_class

WEIGHTS_INDEX = "model.safetensors.index.json"


class OffloadError(UserError, ValueError):
    """An offload folder or checkpoint that cannot serve the blocks."""


def move_outside_blocks(model: nn.Module, blocks: list[nn.Module], device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a block to `device` (tied weights stay tied:
    a shared Parameter is moved once, in place)."""
    skip = {id(b) for b in blocks}

    def visit(module: nn.Module) -> None:
        if id(module) in skip:
            return
        for param in module._parameters.values():
            if param is not None and param.device != device and param.device.type != "meta":
                param.data = param.data.to(device)
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
        for child in module.children():
            visit(child)

    visit(model)


class BlockStore:
    """Blocks resident on the device (`offload=none`): onloading and offloading do nothing."""

    mode: ClassVar[str] = "none"
    resident: ClassVar[bool] = True  # every block stays on the device (a whole-model forward is possible)

    def __init__(self, model: nn.Module, adapter: ModelAdapter, device: torch.device):
        self.model, self.adapter, self.device = model, adapter, torch.device(device)

    @classmethod
    def open(cls, source: str, task: str, dtype: str, device: torch.device, work_dir: Path,
             adapter_factory: AdapterFactory | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase, BlockStore]:
        """(model, tokenizer, store) with the weights where this mode keeps them."""
        model, tokenizer = load_model(source, task, dtype, device)
        return model, tokenizer, cls(model, get_adapter(model, adapter_factory), device)

    @staticmethod
    def footprint(sizes: Sizes, on_cpu: bool) -> Footprint:
        """The weights' bytes on the device, on the host (both the host's on a CPU) and on disk."""
        weights = sizes.block_weights + sizes.rest_weights
        return Footprint(device=weights, host=weights if on_cpu else 0)

    def onload(self, index: int) -> nn.Module:
        """The block `index`, with its weights on the device."""
        return self.adapter.layers()[index]

    def offload(self, index: int) -> None:
        """Give the block's device memory back, writing it back first if it was pruned."""

    @contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        layer = self.onload(index)
        try:
            yield layer
        finally:
            self.offload(index)

    def prepare_for_eval(self) -> None:
        """Make the whole model callable on the device (offloaded blocks stream in during forward)."""

    def close(self) -> None:
        """Remove temporary files."""


class HostStore(BlockStore):
    """Block weights on the host, each moved to the device while it is worked on (`offload=cpu`)."""

    mode: ClassVar[str] = "cpu"
    resident: ClassVar[bool] = False

    @classmethod
    def open(cls, source: str, task: str, dtype: str, device: torch.device, work_dir: Path,
             adapter_factory: AdapterFactory | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase, BlockStore]:
        model, tokenizer = load_model(source, task, dtype, "cpu")
        adapter = get_adapter(model, adapter_factory)
        move_outside_blocks(model, adapter.layers(), device)
        return model, tokenizer, cls(model, adapter, device)

    @staticmethod
    def footprint(sizes: Sizes, on_cpu: bool) -> Footprint:
        return Footprint(device=sizes.rest_weights + sizes.biggest_block, host=sizes.block_weights + sizes.rest_weights)

    def onload(self, index: int) -> nn.Module:
        return self.adapter.layers()[index].to(self.device)

    def offload(self, index: int) -> None:
        if self.device.type != "cpu":
            self.adapter.layers()[index].to("cpu")

    def prepare_for_eval(self) -> None:
        if self.device.type == "cpu":
            return
        from accelerate import dispatch_model

        dispatch_model(self.model, device_map=device_map(self.model, block_names(self.model, self.adapter),
                                                         self.device, "cpu"), main_device=self.device)


class DiskStore(BlockStore):
    """Block weights memory-mapped from safetensors files (`offload=disk`); blocks not being worked
    on hold no memory (their parameters are on the meta device)."""

    mode: ClassVar[str] = "disk"
    resident: ClassVar[bool] = False

    @classmethod
    def open(cls, source: str, task: str, dtype: str, device: torch.device, work_dir: Path,
             adapter_factory: AdapterFactory | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase, BlockStore]:
        return _open_on_disk(source, task, dtype, device, work_dir, adapter_factory)

    @staticmethod
    def footprint(sizes: Sizes, on_cpu: bool) -> Footprint:
        # a disk block is read through its file's pages and copied, and written back the same way
        return Footprint(device=sizes.rest_weights + sizes.biggest_block,
                         host=(sizes.rest_weights if on_cpu else 0) + 2 * sizes.biggest_block,
                         disk=sizes.block_weights)

    def __init__(self, model: nn.Module, adapter: ModelAdapter, device: torch.device, index: dict[str, str],
                 work_dir: Path, dtype: torch.dtype):
        """`index`: parameter name -> safetensors file holding it (under the same name)."""
        super().__init__(model, adapter, device)
        self.index, self.dtype = dict(index), dtype
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.names = block_names(model, adapter)
        self._loaded: dict[int, set[int]] = {}  # block -> ids of the Parameters it was loaded with

    def _params(self, index: int) -> list[tuple[str, nn.Module, str]]:
        """(full name, owning module, attribute) of every parameter of block `index` (the module's
        `_parameters[attribute]` is set)."""
        layer, prefix = self.adapter.layers()[index], self.names[index]
        out = []
        for name, module in layer.named_modules():
            for attr, param in module._parameters.items():
                if param is not None:
                    out.append((f"{prefix}.{name}.{attr}" if name else f"{prefix}.{attr}", module, attr))
        return out

    def onload(self, index: int) -> nn.Module:
        layer = self.adapter.layers()[index]
        for full, module, attr in self._params(index):
            if full not in self.index:
                raise OffloadError(f"offload=disk: no weights for {full!r} in {self.work_dir} or the checkpoint")
            module._parameters[attr] = nn.Parameter(read_tensor(self.index[full], full, self.device, self.dtype),
                                                    requires_grad=False)
            _sync_linear_shape(module)
        self._loaded[index] = {id(p) for p in layer.parameters()}
        return layer.to(self.device)  # buffers

    def offload(self, index: int) -> None:
        params = self._params(index)
        # surgery swaps Parameter objects, so a pruned (or compensated) block has new ones
        if {id(p) for p in self.adapter.layers()[index].parameters()} != self._loaded.pop(index, set()):
            path = self.work_dir / f"block_{index:05d}.safetensors"
            tmp = path.with_suffix(".partial")
            save_file({full: _param(module, attr).detach().contiguous().cpu() for full, module, attr in params},
                      str(tmp))
            tmp.replace(path)
            self.index.update({full: str(path) for full, _, _ in params})
        for _, module, attr in params:
            module._parameters[attr] = nn.Parameter(_param(module, attr).to("meta"), requires_grad=False)

    def prepare_for_eval(self) -> None:
        from accelerate import dispatch_model

        offload_index = {name: {"safetensors_file": file, "weight_name": name, "dtype": str(self.dtype).split(".")[-1]}
                         for name, file in self.index.items() if name.startswith(tuple(n + "." for n in self.names))}
        dispatch_model(self.model, device_map=device_map(self.model, self.names, self.device, "disk"),
                       main_device=str(self.device), offload_dir=str(self.work_dir), offload_index=offload_index)

    def close(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


def _param(module: nn.Module, attr: str) -> nn.Parameter:
    param = module._parameters[attr]
    assert param is not None  # `_params` lists set parameters only
    return param


def _sync_linear_shape(module: nn.Module) -> None:
    """Linear bookkeeping follows its (possibly pruned) weight."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape


def device_map(model: nn.Module, blocks: list[str], device: torch.device, offloaded: str) -> dict[str, object]:
    """An accelerate device map: the blocks `offloaded` ("cpu" or "disk"), every other module on
    `device`, named at the coarsest level that holds no block."""
    blocks_set = set(blocks)
    out: dict[str, object] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full in blocks_set:
                out[full] = offloaded
            elif any(b.startswith(full + ".") for b in blocks_set):
                visit(child, full + ".")
            else:
                out[full] = device
        for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            out[f"{prefix}{name}"] = device

    visit(model, "")
    return out


def block_names(model: nn.Module, adapter: ModelAdapter) -> list[str]:
    """Module names of the blocks, in order."""
    ids = {id(layer): i for i, layer in enumerate(adapter.layers())}
    names = [""] * len(ids)
    for name, module in model.named_modules():
        if id(module) in ids:
            names[ids[id(module)]] = name
    return names


def read_tensor(file: str, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One tensor of a safetensors file, memory-mapped, on `device` in `dtype`."""
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:
            return f.get_tensor(name).to(dtype)
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise OffloadError(f"offload=disk: cannot read {name!r} from {file}: {str(e).splitlines()[0]}") from e


def checkpoint_index(folder: Path) -> dict[str, str]:
    """Parameter name -> safetensors file, for a single-file or sharded checkpoint folder."""
    folder = Path(folder)
    sharded = folder / WEIGHTS_INDEX
    try:
        if sharded.exists():
            weight_map = json.loads(sharded.read_text())["weight_map"]
            return {name: str(folder / file) for name, file in weight_map.items()}
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise OffloadError(f"offload=disk needs safetensors weights; {folder} has none")
        index = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                index.update({name: str(file) for name in f.keys()})
        return index
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, OffloadError):
            raise
        raise OffloadError(f"offload=disk: cannot read the checkpoint index of {folder}: {e}") from e


STORES: dict[str, type[BlockStore]] = {store.mode: store for store in (BlockStore, HostStore, DiskStore)}


def store_class(offload: str) -> type[BlockStore]:
    """The store of an offload mode."""
    if offload not in STORES:
        raise OffloadError(f"execution.offload={offload!r}; allowed: {', '.join(STORES)}")
    return STORES[offload]


def open_model(source: str, task: str, dtype: str, device: torch.device, offload: str,
               work_dir: Path, adapter_factory: AdapterFactory | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase, BlockStore]:
    """(model, tokenizer, store) with block weights where `offload` says; everything outside the
    blocks on the device. `work_dir`: where a disk store writes pruned blocks. `adapter_factory`:
    the configured adapter (`model.adapter`), None for the default."""
    return store_class(offload).open(source, task, dtype, device, work_dir, adapter_factory)


def _open_on_disk(source: str, task: str, dtype: str, device: torch.device, work_dir: Path,
                  adapter_factory: AdapterFactory | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase, BlockStore]:
    """The model skeleton with parameters on the meta device; only what is outside the blocks is
    read (to the device); blocks are read from the checkpoint's safetensors when they are used."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoTokenizer

    from stat_exp.models.conv1d import TransposedLinear
    from stat_exp.models.loading import resolve_source

    folder = Path(resolve_source(source))
    if not folder.is_dir():
        from huggingface_hub import snapshot_download  # a hub id: its cached (or downloaded) snapshot

        folder = Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    torch_dtype = getattr(torch, dtype)
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with init_empty_weights(include_buffers=False):
        model = model_class(config, task)._from_config(config, dtype=torch_dtype)  # transformers picks the attention
    adapter = get_adapter(model, adapter_factory)
    if any(isinstance(m, TransposedLinear) for layer in adapter.layers() for m in layer.modules()):
        raise OffloadError("offload=disk reads block weights by name, and Conv1D checkpoints (GPT-2) store them "
                           "transposed; use execution.offload=cpu")
    index = checkpoint_index(folder)
    inside = tuple(name + "." for name in block_names(model, adapter))
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    for name, _ in model.named_parameters():
        if name.startswith(inside):
            continue
        if name not in index:
            if name in tied:
                continue
            raise OffloadError(f"offload=disk: the checkpoint in {folder} has no tensor {name!r}")
        set_module_tensor_to_device(model, name, device, value=read_tensor(index[name], name, device, torch_dtype))
    model.tie_weights()
    move_outside_blocks(model, adapter.layers(), device)  # buffers
    return model.eval(), tokenizer, DiskStore(model, adapter, device, index, work_dir, torch_dtype)
