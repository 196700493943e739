"""A training step never waits for the host (issue 14, deliverable 4).

One real ``train_step`` of each main trainer (``tests/trainer_harness.py``: nnU-Net's constructor and
``initialize()``, tiny backbone, CPU) runs under :class:`HostSyncRecorder`, which records every call
that makes the host wait for the device on an accelerator:

- reads of device values into Python: ``Tensor.item / tolist / numpy / cpu``, ``bool() / int() /
  float() / index()`` of a tensor (an ``if tensor`` included), and ATen's ``_local_scalar_dense`` that
  they and C++ code reach;
- operations whose output shape depends on the data, so the host must read a count first:
  ``nonzero`` (``torch.where(mask)``, ``argwhere``), ``masked_select``, indexing with a bool tensor,
  ``unique``, ``repeat_interleave`` without ``output_size``, ``bincount``, ``multinomial`` (its input
  checks read the device), ``equal``;
- copies of host data to a device: ``torch.tensor / as_tensor`` given a device other than the literal
  ``"cpu"`` (``device=x.device`` is a blocking copy from pageable memory on an accelerator).

Function-level calls come through ``torch.overrides.TorchFunctionMode`` (``.cpu()``, ``.numpy()`` and
``.tolist()`` of a CPU tensor reach no ATen operator), ATen-level ones through ``TorchDispatchMode``
(which also sees what C++ code dispatches, e.g. the ``index`` of ``x[mask]``); a read that the
function level recorded is not counted again at the ATen level. Each record carries its call site.

Allowed, by call site: nnU-Net's loss logging at the end of ``train_step``
(``loss.detach().cpu().numpy()``: one read per step, which nnU-Net's logger needs); the optimiser's
``.item()`` of its step counters in ``torch/optim`` (torch keeps those on the host unless the
optimiser is ``capturable`` or ``fused``, so they read no device memory); ``F.one_hot``'s range
check, which ATen runs on CPU tensors only. Everything else fails the test with its call sites. SciPy's
distance transform is patched to raise, and no Python function of SciPy or numpy may run during the
step (``sys.setprofile``), so no step falls back to the host for its geometry either.
"""
from __future__ import annotations

import contextlib
import io
import linecache
import os
import sys
from dataclasses import dataclass

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from trainer_harness import build_trainer, make_batch, trainer_workdir

IMG_SIZE = 32
NUM_CLASSES = 5
STACK_DEPTH = 3
BACKBONE = "tinyvit_test"
MAIN_TRAINERS = ("SAMedTrainer", "HSPSAMTrainer", "HSAMTrainer", "SelfPromptSAMTrainer", "AutoMedSAMTrainer")

# Function-level reads of a device value into Python.
READ_METHODS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}
# ATen operators that read the device: a scalar read, or an output shape that depends on the data.
SYNCING_OPERATORS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
                     "unique_consecutive", "multinomial", "bincount", "equal", "is_nonzero", "item"}
HOST_TO_DEVICE = {"tensor", "as_tensor"}

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_MODE_CODE = ("__torch_function__", "__torch_dispatch__", "_call_site")  # this file's recording frames
_OPTIM_DIR = os.path.join(_TORCH_DIR, "optim") + os.sep


@dataclass(frozen=True)
class SyncCall:
    """One recorded call: what (``Tensor.item``, ``aten.nonzero``, ...) and where (see :func:`_call_site`)."""

    what: str
    filename: str
    function: str
    line: str
    caller: str

    def __str__(self) -> str:
        return f"{self.what} at {self.caller}"


def _call_site(what: str) -> SyncCall:
    """The frames of the call being recorded: ``filename / function / line`` of the innermost one outside
    torch (torch's optimisers count as outside: they are a call site of their own), ``caller`` the
    innermost one outside torch altogether."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if not (code.co_filename == __file__ and code.co_name in _MODE_CODE):
            frames.append(frame)
        frame = frame.f_back
    outside = [f for f in frames if not f.f_code.co_filename.startswith(_TORCH_DIR)]
    innermost = next(f for f in frames if f in outside or f.f_code.co_filename.startswith(_OPTIM_DIR))
    project = outside[0]
    caller = (f"{os.path.relpath(project.f_code.co_filename)}:{project.f_lineno} {project.f_code.co_name}: "
              f"{linecache.getline(project.f_code.co_filename, project.f_lineno).strip()}")
    return SyncCall(what=what, filename=innermost.f_code.co_filename, function=innermost.f_code.co_name,
                    line=linecache.getline(innermost.f_code.co_filename, innermost.f_lineno).strip(), caller=caller)


def _bool_index(indices) -> bool:
    items = indices if isinstance(indices, (list, tuple)) else (indices,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


class _Functions(TorchFunctionMode):
    def __init__(self, recorder: "HostSyncRecorder") -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READ_METHODS and args and isinstance(args[0], torch.Tensor):
            self.recorder.calls.append(_call_site(f"Tensor.{name}"))
            self.recorder.inside_read += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.recorder.inside_read -= 1
        device = kwargs.get("device")
        if name in HOST_TO_DEVICE and device not in (None, "cpu") and not isinstance(args[0], torch.Tensor):
            self.recorder.calls.append(_call_site(f"torch.{name}(host data, device=...)"))
        return func(*args, **kwargs)


class _Operators(TorchDispatchMode):
    def __init__(self, recorder: "HostSyncRecorder") -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        syncs = (name in SYNCING_OPERATORS
                 or (name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor")
                     and kwargs.get("output_size") is None)
                 or (name in ("index", "index_put", "index_put_") and len(args) > 1 and _bool_index(args[1])))
        if syncs and not self.recorder.inside_read:
            self.recorder.calls.append(_call_site(f"aten.{name}"))
        return func(*args, **kwargs)


class HostSyncRecorder:
    """Context manager: ``calls`` lists the :class:`SyncCall` of everything inside it that would make the
    host wait for an accelerator (see the module docstring)."""

    def __init__(self) -> None:
        self.calls: list[SyncCall] = []
        self.inside_read = 0

    def __enter__(self) -> "HostSyncRecorder":
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(_Functions(self))
        self._stack.enter_context(_Operators(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def is_nnunet_loss_logging(call: SyncCall) -> bool:
    """``loss.detach().cpu().numpy()`` in samunet's ``train_step`` (nnU-Net's own logging of the loss)."""
    return (call.what in ("Tensor.cpu", "Tensor.numpy") and call.function == "train_step"
            and call.filename.endswith(os.path.join("samunet", "trainers", "base.py"))
            and "loss.detach().cpu().numpy()" in call.line)


def is_host_side_optimizer_counter(call: SyncCall) -> bool:
    """The optimiser's ``.item()`` of its step counter (``torch/optim/optimizer.py::_get_value``): a
    host tensor unless the optimiser is capturable or fused."""
    return (call.what == "Tensor.item" and call.function == "_get_value"
            and call.filename.startswith(os.path.join(_TORCH_DIR, "optim")))


def is_cpu_only_one_hot_check(call: SyncCall) -> bool:
    """``F.one_hot``'s range check of its input: ATen runs it on CPU tensors only (on CUDA a device-side
    assertion replaces it), so it is no host sync where one would matter."""
    return call.what == "aten._local_scalar_dense" and "one_hot(" in call.line


def unexpected(calls: list[SyncCall]) -> list[SyncCall]:
    """The calls none of the allowed call sites explains."""
    return [c for c in calls if not (is_nnunet_loss_logging(c) or is_host_side_optimizer_counter(c)
                                     or is_cpu_only_one_hot_check(c))]


class HostLibraryCalls:
    """Context manager: ``calls`` lists the Python functions of SciPy and numpy entered inside it
    (``sys.setprofile``; a module that bound ``distance_transform_edt`` at import is seen too)."""

    LIBRARIES = tuple(os.sep + name + os.sep for name in ("scipy", "numpy"))

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _profile(self, frame, event, arg) -> None:
        if event == "call" and any(part in frame.f_code.co_filename for part in self.LIBRARIES):
            self.calls.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    def __enter__(self) -> "HostLibraryCalls":
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(self._previous)


def recorded_train_step(trainer, batch: dict) -> tuple[list[SyncCall], list[str]]:
    """The calls :class:`HostSyncRecorder` and :class:`HostLibraryCalls` record during one
    ``trainer.train_step(batch)`` (after nnU-Net's epoch start, which sets up the phase)."""
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    trainer.on_train_epoch_start()
    with HostSyncRecorder() as recorder, HostLibraryCalls() as libraries:
        trainer.train_step(batch)
    return recorder.calls, libraries.calls


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    with trainer_workdir(tmp_path_factory.mktemp("host_sync")):
        yield


def quiet_trainer(name: str):
    """``name`` built by the harness (tiny backbone, 5 classes, 32 px, stacks of 3), nnU-Net's prints muted."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return build_trainer(name, backbone=BACKBONE, num_classes=NUM_CLASSES, img_size=IMG_SIZE, depth=STACK_DEPTH)


def test_the_recorder_sees_each_kind_of_host_sync_and_nothing_else():
    x = torch.arange(12.0).view(3, 4)
    mask = x > 5
    with HostSyncRecorder() as recorder:
        x[0, 0].item()
        x.tolist()
        x.cpu()
        x.numpy()
        bool(mask.any())
        int(x[0, 0])
        float(x[0, 0])
        if mask.any():
            pass
        x[mask]
        x[mask] = 0.0
        mask.nonzero()
        torch.where(mask)
        x.masked_select(mask)
        torch.unique(x)
        torch.multinomial(torch.ones(3), 1)
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.tensor([1.0, 2.0], device=x.device)
    what = [call.what for call in recorder.calls]
    assert what == ["Tensor.item", "Tensor.tolist", "Tensor.cpu", "Tensor.numpy", "Tensor.__bool__", "Tensor.__int__",
                    "Tensor.__float__", "Tensor.__bool__", "aten.index", "aten.index_put_", "aten.nonzero",
                    "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.multinomial",
                    "aten.repeat_interleave", "torch.tensor(host data, device=...)"]
    assert all(call.caller.startswith(os.path.relpath(__file__)) for call in recorder.calls)
    with HostSyncRecorder() as recorder:  # masked arithmetic, reductions, integer indexing: no sync
        torch.where(mask, x, 0.0).amax(dim=1).argmax()
        x[torch.tensor([0, 2])]
        torch.zeros(3, 5).scatter_reduce(1, torch.zeros(3, 4, dtype=torch.long), x, reduce="amax")
        torch.rand(3, device=x.device)
        torch.tensor(2.0, device="cpu")
    assert recorder.calls == []


@pytest.mark.parametrize("name", MAIN_TRAINERS)
def test_a_train_step_reads_the_device_only_for_nnunets_loss_logging(name, workdir, monkeypatch):
    """One real train_step: no host sync but the loss nnU-Net logs (``.cpu().numpy()`` once), and no SciPy
    or numpy function (SciPy's distance transform, the former prompt geometry, raises if called); then
    the network's inference forward (eval mode): no host sync at all."""
    import scipy.ndimage

    def host_transform(*args, **kwargs):
        raise AssertionError("scipy.ndimage.distance_transform_edt called during a train step")

    monkeypatch.setattr(scipy.ndimage, "distance_transform_edt", host_transform)
    trainer = quiet_trainer(name)
    batch = make_batch(trainer, batch_size=2, seed=1)
    torch.manual_seed(0)
    calls, library_calls = recorded_train_step(trainer, batch)
    assert [str(call) for call in unexpected(calls)] == []
    assert sorted(call.what for call in calls if is_nnunet_loss_logging(call)) == ["Tensor.cpu", "Tensor.numpy"]
    assert library_calls == []
    network = trainer.network_module.eval()  # the forward nnU-Net's predictor slides over a volume
    with torch.no_grad(), HostSyncRecorder() as recorder, HostLibraryCalls() as libraries:
        network(batch["data"])
    assert [str(call) for call in unexpected(recorder.calls)] == [] and libraries.calls == []


def test_an_item_added_to_a_forward_is_caught(workdir):
    """The check of a train step is not blind: a ``.item()`` in the network's forward (here a forward hook)
    is reported with its call site."""
    trainer = quiet_trainer("SAMedTrainer")
    batch = make_batch(trainer, batch_size=2, seed=1)

    def read_back(module, args, output) -> None:
        output.mean().item()

    hook = trainer.network_module.register_forward_hook(read_back)
    try:
        calls, _ = recorded_train_step(trainer, batch)
    finally:
        hook.remove()
    caught = unexpected(calls)
    assert [call.what for call in caught] == ["Tensor.item"] and "output.mean().item()" in caught[0].caller
