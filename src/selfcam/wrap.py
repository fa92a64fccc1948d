"""``selfcam.wrap``: any PyTorch classifier as a self-explaining model (docs/own-model.md).

``wrap(model, method)`` finds the model's last spatial feature map ``F (N, K, h, w)`` and its
classifier, cuts the model there and puts the ``method`` head on ``F``. The result is a
:class:`~selfcam.model.SelfExplainer` like every other selfcam model: its forward pass returns
an :class:`~selfcam.heads.ExplainedOutput`, and ``fit``, checkpoints, export and the bench take it.

How it decides (one probe forward pass in eval mode, on random input of ``input_size``):

1. timm models (``forward_features`` + ``forward_head`` + ``get_classifier``, no ``features=``):
   ``F = forward_features(x)``, the classifier is ``get_classifier()``; token outputs ``(N, L, C)``
   become a grid by dropping the model's ``num_prefix_tokens`` and reshaping to its patch grid,
   channels-last outputs (``output_fmt == "NHWC"``) are permuted.
2. Any other module: the **classifier** is ``classifier=NAME``, else the ``nn.Linear`` whose output
   is the model's logits (the output itself, the first tensor of a returned tuple or list, the
   ``"logits"`` entry of a dict, or the dict's only 2-D tensor), else the last ``nn.Linear`` that ran.
   The **feature map** is ``features=NAME``, else the output of the module that finished last before
   the classifier started among those giving a 4-D output with ``h * w > 1`` that are not pooling
   layers and do not hand their input through unchanged (the outermost of nested modules giving the
   same tensor wins). With ``tokens=``, 3-D token outputs ``(N, L, C)`` are looked for instead and
   reshaped explicitly to ``(N, C, h, w)``.
3. The stage ABN copies (``backbone.last``) is the feature module, or its last child when the
   feature module starts from the input itself (torchvision's ``features``).
4. The cut: ``torchvision.models.feature_extraction.create_feature_extractor`` gives the part
   before the stage (an FX graph, nothing after the cut is kept); a model FX cannot trace is cut
   by standing in a module for the stage that stops the forward pass there ("hooks").
5. Between ``F`` and the classifier: ``GAP``, ``GAP`` after a ReLU (DenseNet), or a LayerNorm on
   the pooled vector (ConvNeXt) is reproduced exactly (the LayerNorm with the pooled statistics
   before the pooling); selfcam tries them in this order and keeps the first that gives the original
   classifier's logits on the probe. The head's linear layer starts as a copy of the classifier
   when the shapes allow; then ``plain`` keeps the model's predictions (``wrap_info.preserved``),
   and a ``UserWarning`` says so when it cannot.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .backbones import Backbone, _TimmFeatures, timm_model, torchvision_model
from .errors import ConfigError, InputError
from .model import ModelConfig, SelfExplainer, init_classifier, make_head

__all__ = ["PooledNorm", "TokenGrid", "WrapInfo", "build_user_model", "model_factory", "named_model", "rebuild", "source_name",
           "tokens_spec", "user_class", "wrap"]

_OPTIONS = ("model_kwargs", "features", "classifier", "tokens", "post", "route", "input_size", "pretrained")
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten)


@dataclass(frozen=True)
class WrapInfo:
    """What :func:`wrap` found: ``model.wrap_info``.

    ``features``: the module whose output is ``F`` (None: timm's ``forward_features``); ``stage``: the
    module ABN copies (None: not splittable); ``classifier``: the original classifier; ``route``:
    ``"timm"``, ``"fx"`` or ``"hooks"``; ``post``: what sits between ``F`` and the pooling
    (``"relu"``, ``"norm:NAME"``, None); ``preserved``: GAP + the original classifier on the wrapped
    features gave the original logits on the probe; ``classifier_copied``: the head's linear layer
    starts as the original classifier; ``note``: why not, when not.
    """

    source: str
    features: str | None
    stage: str | None
    classifier: str | None
    route: str
    post: str | None
    tokens: dict[str, Any] | None
    preserved: bool
    classifier_copied: bool
    note: str = ""


class TokenGrid(nn.Module):
    """Tokens ``(N, L, C)`` to a grid ``(N, C, h, w)``: the first ``prefix`` tokens (class, register,
    distillation tokens) are dropped, the rest reshaped row by row to ``grid`` (square when None)."""

    def __init__(self, prefix: int = 0, grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.prefix = int(prefix)
        self.grid = tuple(grid) if grid is not None else None

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 3:
            raise InputError(f"expected tokens (N, L, C), got shape {tuple(tokens.shape)}")
        patches = tokens[:, self.prefix :]
        n = patches.shape[1]
        h, w = self.grid if self.grid is not None else (math.isqrt(n), math.isqrt(n))
        if h * w != n:
            raise InputError(f"{n} patch tokens (after {self.prefix} prefix tokens) do not fill a {h}x{w} grid; "
                             "give the grid: tokens={'prefix': P, 'grid': [h, w]}")  # fmt: skip
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], h, w)

    def extra_repr(self) -> str:
        return f"prefix={self.prefix}, grid={self.grid}"


class _ChannelsFirst(nn.Module):
    """``(N, h, w, C) -> (N, C, h, w)`` for timm models whose features are channels-last."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


class PooledNorm(nn.Module):
    """A classifier's LayerNorm on the pooled vector, moved before the pooling.

    ``F' = (F - mu) / sqrt(var + eps) * gamma + beta`` with ``mu`` and ``var`` the mean and variance
    over channels of ``GAP(F)``, per sample: then ``GAP(F') == LayerNorm(GAP(F))`` exactly (the
    transform is affine in ``F`` with per-sample constants), so GAP + linear on ``F'`` is the
    original norm + linear classifier, and ``F'`` is a map the CAM can read.
    """

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, f: Tensor) -> Tensor:
        pooled = f.mean(dim=(-2, -1), keepdim=True)
        mu = pooled.mean(dim=1, keepdim=True)
        var = pooled.var(dim=1, keepdim=True, unbiased=False)
        out = (f - mu) * torch.rsqrt(var + self.norm.eps)
        if self.norm.weight is not None:
            out = out * self.norm.weight[:, None, None]
        if self.norm.bias is not None:
            out = out + self.norm.bias[:, None, None]
        return out


class _Stop(Exception):
    def __init__(self, value: Any) -> None:
        super().__init__("selfcam cut")
        self.value = value


class _StopHere(nn.Module):
    """Stands in for a module of the wrapped model and ends its forward pass there, with what reaches
    it (``inner=None``) or with what ``inner`` makes of it."""

    def __init__(self, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise _Stop(args[0] if self.inner is None else self.inner(*args, **kwargs))


class _UntilStop(nn.Module):
    """The wrapped model's forward pass up to its :class:`_StopHere`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        try:
            self.model(x)
        except _Stop as stop:
            return stop.value
        raise InputError("the wrapped model's forward pass did not reach its feature stage for this input")


# --- the probe ----------------------------------------------------------------------


@dataclass
class _Call:
    name: str
    module: nn.Module
    start: int
    end: int
    args: tuple[Any, ...]
    output: Any  # the object the module returned (identity checks)
    value: Any  # a copy taken when it returned (the model may change ``output`` in place later: DenseNet's ReLU)
    linear_input: Tensor | None = None  # for nn.Linear: a copy of its input


def _probe(model: nn.Module, run: Callable[[], Any]) -> tuple[Any, list[_Call]]:
    """``run()`` with every submodule of ``model`` hooked: its result and each module call, in order."""
    calls: list[_Call] = []
    tick = itertools.count()
    started: dict[int, list[int]] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def pre(mod: nn.Module, args: Any) -> None:
            started.setdefault(id(mod), []).append(next(tick))

        def post(mod: nn.Module, args: Any, output: Any, name: str = name) -> None:
            value = output.clone() if isinstance(output, Tensor) else output
            first = args[0].clone() if isinstance(mod, nn.Linear) and args and isinstance(args[0], Tensor) else None
            calls.append(_Call(name, mod, started[id(mod)].pop(), next(tick), args, output, value, first))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            result = run()
    finally:
        for h in handles:
            h.remove()
    return result, calls


def _shape(v: Any) -> str:
    return str(tuple(v.shape)) if isinstance(v, Tensor) else type(v).__name__


def _listing(calls: list[_Call], limit: int = 8) -> str:
    seen = [f"{c.name} {_shape(c.output)}" for c in calls[-limit:]]
    return ", ".join(seen) if seen else "none"


def _logits_of(out: Any) -> tuple[Tensor | None, str]:
    """The logits in what a model returned, and where they were (for messages)."""
    if isinstance(out, Tensor):
        return out, "its output"
    if isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            if isinstance(v, Tensor):
                return v, f"element {i} of the returned {type(out).__name__}"
        return None, f"a {type(out).__name__} without tensors"
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), Tensor):
            return out["logits"], "its 'logits' entry"
        flat = [k for k, v in out.items() if isinstance(v, Tensor) and v.dim() == 2]
        if len(flat) == 1:
            return out[flat[0]], f"its {flat[0]!r} entry"
        return None, f"a dict with keys {sorted(map(str, out))} and no 'logits' entry"
    logits = getattr(out, "logits", None)
    return (logits, "its .logits") if isinstance(logits, Tensor) else (None, f"a {type(out).__name__}")


def _is_map(c: _Call, rank: int) -> bool:
    out = c.output
    if not isinstance(out, Tensor) or out.dim() != rank or (c.args and out is c.args[0]):
        return False
    if rank == 4:
        pooling = isinstance(c.module, _POOLS) or "pool" in type(c.module).__name__.lower()
        return not pooling and out.shape[-1] * out.shape[-2] > 1
    return True


def tokens_spec(tokens: Any) -> dict[str, Any] | None:
    """``tokens=`` as ``{"prefix": P, "grid": [h, w] or None}``."""
    if tokens is None:
        return None
    if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
        return {"prefix": tokens, "grid": None}
    if isinstance(tokens, Mapping) and set(tokens) <= {"prefix", "grid"}:
        prefix, grid = tokens.get("prefix", 0), tokens.get("grid")
        grid_ok = grid is None or (len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid))
        if isinstance(prefix, int) and prefix >= 0 and grid_ok:
            return {"prefix": prefix, "grid": list(grid) if grid is not None else None}
    raise ConfigError(f"tokens must be the number of prefix tokens or {{'prefix': P, 'grid': [h, w]}}, got {tokens!r}")


def _name_of(model: nn.Module, target: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if m is target), None)


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model``; return what was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1.0 + scale)))


# --- the wrap -------------------------------------------------------------------------


@dataclass
class _Found:
    """The probe's findings: the map ``F`` as the head will see it before ``post``, the classifier."""

    feats: Tensor  # (N, K, h, w)
    classifier: nn.Module | None
    classifier_name: str | None
    classifier_input: Tensor | None  # what the classifier received on the probe
    norms: list[tuple[str, nn.Module]]  # LayerNorms that ran between F and the classifier
    features: str | None = None
    hint: str = ""  # why the logits may differ, when the model says (timm's class-token pooling)


def _post_candidates(found: _Found, k: int) -> list[tuple[str | None, nn.Module | None]]:
    cands: list[tuple[str | None, nn.Module | None]] = [(None, None), ("relu", nn.ReLU())]
    for name, norm in found.norms:
        if isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (k,):
            cands.append((f"norm:{name}", PooledNorm(copy.deepcopy(norm))))
    return cands


def _choose_post(found: _Found, recorded: str | None, use_recorded: bool) -> tuple[str | None, nn.Module | None, bool, str]:
    """The module between ``F`` and the pooling whose GAP is exactly what the classifier receives (so GAP + the
    classifier give the original logits, whatever its weights: a zero-initialised classifier proves nothing)."""
    k = found.feats.shape[1]
    cands = _post_candidates(found, k)
    if use_recorded:
        hit = [c for c in cands if c[0] == recorded]
        if not hit:
            raise ConfigError(f"recorded feature post-processing {recorded!r} is not in this model")
        cands = hit
    fc = found.classifier
    if not isinstance(fc, nn.Linear) or found.classifier_input is None:
        return (cands[0][0], cands[0][1], False, "no linear classifier whose logits could be kept")
    if fc.in_features != k:
        return (cands[0][0], cands[0][1], False, f"the classifier {found.classifier_name} takes {fc.in_features} "
                f"features, the map has {k} channels: its input is not GAP(F) (an MLP or a flattened grid)")  # fmt: skip
    z = found.classifier_input.flatten(1)
    for name, module in cands:
        with torch.no_grad():
            got = (found.feats if module is None else module(found.feats)).mean(dim=(-2, -1))
        if _close(got, z):
            return name, module, True, ""
    name, module = cands[0]
    why = found.hint or "something other than average pooling, a ReLU or a LayerNorm sits between them"
    return name, module, False, f"GAP + {found.classifier_name} on the map does not give the model's logits ({why})"


def _in_chans(model: nn.Module, given: int | None) -> int:
    if given is not None:
        if not isinstance(given, int) or isinstance(given, bool) or given < 1:
            raise ConfigError(f"in_chans must be an integer >= 1, got {given!r}")
        return given
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def _input_size(model: nn.Module, given: Any) -> tuple[int, int]:
    if given is None:
        img = getattr(getattr(model, "patch_embed", None), "img_size", None)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        given = img if img is not None else (cfg.get("input_size", (3, 224, 224))[1:] if cfg else 224)
    size = (given, given) if isinstance(given, int) else tuple(given)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
        raise ConfigError(f"input_size must be an integer or (H, W), got {given!r}")
    return int(size[0]), int(size[1])


def _is_timm(model: nn.Module) -> bool:
    return all(callable(getattr(model, a, None)) for a in ("forward_features", "forward_head", "get_classifier", "reset_classifier"))


def _timm_route(model: nn.Module, x: Tensor, tokens: dict[str, Any] | None) -> tuple[_Found, list[nn.Module], dict[str, Any] | None]:
    """timm: ``forward_features`` is the trunk, ``get_classifier()`` the classifier."""
    with torch.no_grad():
        feats = model.forward_features(x)
    _, calls = _probe(model, lambda: model.forward_head(feats))
    classifier = model.get_classifier()
    pre: list[nn.Module] = []
    if isinstance(feats, Tensor) and feats.dim() == 3:
        embed = getattr(model, "patch_embed", None)
        auto = {"prefix": int(getattr(model, "num_prefix_tokens", 0)), "grid": None}
        grid = getattr(embed, "grid_size", None)
        if grid is not None and not getattr(model, "dynamic_img_size", False):
            auto["grid"] = [int(g) for g in grid]
        tokens = tokens or auto
        pre.append(TokenGrid(tokens["prefix"], tokens["grid"]))
    elif isinstance(feats, Tensor) and feats.dim() == 4 and getattr(model, "output_fmt", "NCHW") == "NHWC":
        pre.append(_ChannelsFirst())
    elif not (isinstance(feats, Tensor) and feats.dim() == 4):
        raise ConfigError(f"timm model {type(model).__name__}: forward_features gives {_shape(feats)}, not a map "
                          "(N, K, h, w) or tokens (N, L, C); name the feature module with features=")  # fmt: skip
    grid = feats
    for m in pre:
        grid = m(grid)
    norms = [(c.name, c.module) for c in calls if isinstance(c.module, nn.LayerNorm)]
    name = _name_of(model, classifier) if isinstance(classifier, nn.Module) else None
    z = next((c.linear_input for c in calls if c.module is classifier), None)
    found = _Found(grid, classifier if isinstance(classifier, nn.Linear) else None, name, z, norms)
    if feats.dim() == 3 and getattr(model, "global_pool", None) == "token":
        found.hint = "the model classifies its class token; the head pools the patch tokens"
    return found, pre, tokens


def _find(model: nn.Module, x: Tensor, features: str | None, classifier: str | None, tokens: dict[str, Any] | None,
          need_classifier: bool) -> tuple[_Found, list[_Call]]:  # fmt: skip
    """The generic rules (module docstring, rule 2) on one probe pass."""
    out, calls = _probe(model, lambda: model(x))
    names = {n for n, _ in model.named_modules()}
    linears = [c for c in calls if isinstance(c.module, nn.Linear)]
    cls: _Call | None = None
    if classifier is not None:
        if classifier not in names:
            raise ConfigError(f"classifier={classifier!r}: no such module; linear layers that ran: "
                              f"{_listing(linears) if linears else 'none'}")  # fmt: skip
        hits = [c for c in calls if c.name == classifier]
        if not hits or not isinstance(hits[-1].module, nn.Linear):
            raise ConfigError(f"classifier={classifier!r} must be an nn.Linear that runs in the forward pass "
                              f"(got {type(model.get_submodule(classifier)).__name__}, ran {len(hits)} time(s))")  # fmt: skip
        cls = hits[-1]
    else:
        logits, where = _logits_of(out)
        producing = [c for c in linears if logits is not None and c.output is logits]
        if producing:
            cls = producing[-1]
        elif logits is None and isinstance(out, Mapping) and linears:
            raise ConfigError(f"the model returns {where}: name its classifier with classifier=NAME "
                              f"(linear layers that ran: {_listing(linears)})")  # fmt: skip
        elif linears:
            cls = linears[-1]
        elif need_classifier:
            raise ConfigError(f"no nn.Linear classifier ran in {type(model).__name__}'s forward pass (modules seen: "
                              f"{_listing(calls)}); name it with classifier=NAME, or give num_classes for a new one")  # fmt: skip
    rank = 3 if tokens is not None else 4
    before = [c for c in calls if cls is None or c.end < cls.start]
    if features is not None:
        if features not in names:
            raise ConfigError(f"features={features!r}: no such module; modules seen before the classifier: {_listing(before)}")
        hits = [c for c in calls if c.name == features]
        if len(hits) != 1 or not isinstance(hits[0].output, Tensor) or hits[0].output.dim() != rank:
            want = "tokens (N, L, C)" if rank == 3 else "a map (N, K, h, w)"
            got = _shape(hits[0].output) if hits else "nothing (it did not run)"
            raise ConfigError(f"features={features!r} must run once and give {want}; it ran {len(hits)} time(s), "
                              f"giving {got}")  # fmt: skip
        m = hits[0]
    else:
        cands = [c for c in before if _is_map(c, rank)]
        if not cands:
            tok = [c for c in before if isinstance(c.output, Tensor) and c.output.dim() == 3]
            hint = f"; token outputs (give tokens=P): {_listing(tok, 4)}" if tok and rank == 4 else ""
            what = "token output (N, L, C)" if rank == 3 else "spatial feature map (N, K, h, w) with h * w > 1"
            raise ConfigError(f"no {what} found before the classifier in {type(model).__name__}: candidate layers "
                              f"{_listing(before)}{hint}; name one with features=NAME (or a larger input_size)")  # fmt: skip
        m = max(cands, key=lambda c: c.end)
        later = [c for c in before if c.start > m.end and isinstance(c.output, Tensor) and c.output.dim() == 3
                 and not (c.args and c.output is c.args[0])] if rank == 4 else []  # fmt: skip
        if later:
            raise ConfigError(f"the last spatial map is {m.name} {_shape(m.output)}, but token outputs follow it: "
                              f"{_listing(later, 4)}; for a token model give tokens=P (the prefix tokens to drop), "
                              f"or features={m.name!r} to take the map")  # fmt: skip
    if sum(c.name == m.name for c in calls) != 1:
        raise ConfigError(f"feature module {m.name!r} runs more than once per forward pass; name another with features=")
    feats = m.value if tokens is None else TokenGrid(tokens["prefix"], tokens["grid"])(m.value)
    norms = [(c.name, c.module) for c in calls
             if isinstance(c.module, nn.LayerNorm) and c.start > m.end and (cls is None or c.end < cls.start)]  # fmt: skip
    found = _Found(feats, cls.module if cls else None, cls.name if cls else None,
                   cls.linear_input if cls else None, norms, features=m.name)  # fmt: skip
    return found, calls


def _stage(model: nn.Module, m: _Call, calls: list[_Call], x: Tensor) -> _Call | None:
    """The stage ABN copies: the feature module, or its last child when it starts from the input."""
    if not (m.args and m.args[0] is x):
        return m if len(m.args) == 1 and isinstance(m.args[0], Tensor) else None
    children = list(m.module.named_children())
    if not children:
        return None
    child = f"{m.name}.{children[-1][0]}"
    hits = [c for c in calls if c.name == child]
    if len(hits) == 1 and hits[0].output is m.output and len(hits[0].args) == 1 and isinstance(hits[0].args[0], Tensor):
        return hits[0]
    return None


def _fx_trunk(model: nn.Module, stage: _Call, calls: list[_Call], x: Tensor) -> nn.Module | None:
    """The part of ``model`` before ``stage``, as torchvision's FX feature extractor (None if it cannot)."""
    src = stage.args[0]
    if src is x:
        return nn.Identity()
    producers = [c for c in calls if c.output is src and c.end < stage.start]
    if not producers:
        return None
    producer = max(producers, key=lambda c: c.end)
    if sum(c.name == producer.name for c in calls) != 1:
        return None
    try:
        from torchvision.models.feature_extraction import create_feature_extractor

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = create_feature_extractor(model, {producer.name: "pre"})
        for graph in {id(g): g for g in _graphs(gm)}.values():
            out = next(n for n in graph.nodes if n.op == "output")
            out.args = (out.args[0]["pre"],)
        gm.recompile()
        return gm
    except Exception:  # FX cannot trace the model (data-dependent control flow...): the hooks route
        return None


def _graphs(gm: nn.Module) -> list[Any]:
    """The FX graphs of a (dual train/eval) graph module."""
    graphs = [gm.graph]
    for attr in ("train_graph", "eval_graph"):
        g = getattr(gm, attr, None)
        if g is not None:
            graphs.append(g)
    return graphs


def _drop_after(model: nn.Module, calls: list[_Call], after: int, keep: set[str]) -> None:
    """Replace the modules that run only after tick ``after`` (never reached once cut) by ``nn.Identity``."""
    late: dict[str, bool] = {}
    for c in calls:
        late[c.name] = late.get(c.name, True) and c.start > after
    for name, only_late in late.items():
        inside = any(name == k or name.startswith(k + ".") for k in keep)
        if only_late and not inside and not any(name.startswith(k + ".") for k in late if late[k] and k != name):
            try:
                _replace(model, name, nn.Identity())
            except AttributeError:  # already replaced with its parent
                pass


def _params_overlap(a: nn.Module, b: nn.Module) -> bool:
    return bool({id(p) for p in a.parameters()} & {id(p) for p in b.parameters()})


def _generic_backbone(model: nn.Module, found: _Found, calls: list[_Call], x: Tensor,
                      route: str | None) -> tuple[nn.Module, nn.Module | None, bool, str, str | None]:  # fmt: skip
    """``(trunk, stage module or None, splittable, route, stage name)`` for the generic rules."""
    m = next(c for c in calls if c.name == found.features)
    stage = _stage(model, m, calls, x)
    if stage is not None and route in (None, "fx"):
        trunk = _fx_trunk(model, stage, calls, x)
        if trunk is not None and not _params_overlap(trunk, stage.module):
            with torch.no_grad():
                ok = isinstance(m.value, Tensor) and _close(stage.module(trunk(x)), m.value)
            if ok:
                return trunk, stage.module, True, "fx", stage.name
        if route == "fx":
            raise ConfigError(f"this model's recorded cut (FX, at {stage.name!r}) no longer traces")
    if stage is not None:
        _drop_after(model, calls, stage.start, {stage.name})
        last = _replace(model, stage.name, _StopHere())
        return _UntilStop(model), last, True, "hooks", stage.name
    _drop_after(model, calls, m.end, {m.name})
    inner = model.get_submodule(m.name)
    _replace(model, m.name, _StopHere(inner))
    return _UntilStop(model), None, False, "hooks", None


def _json_ready(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} must be JSON-serializable to be recorded in the run's config: {e}") from e


def named_model(source: str, model_kwargs: dict[str, Any]) -> nn.Module:
    """A whole torchvision (``torchvision:NAME`` or a bare name) or timm (``timm:NAME``) classifier, random weights."""
    try:
        if source.startswith("timm:"):
            return timm_model(source[5:], **model_kwargs)
        return torchvision_model(source.removeprefix("torchvision:"), **model_kwargs)
    except TypeError as e:
        raise ConfigError(f"bad option in model_kwargs for {source!r}: {e}") from e


def source_name(model: Any) -> str:
    if isinstance(model, str):
        return model if model.startswith(("timm:", "torchvision:")) else f"torchvision:{model}"
    return f"user:{type(model).__name__}"


def wrap(
    model: nn.Module | str,
    method: str = "plain",
    *,
    features: str | None = None,
    classifier: str | None = None,
    num_classes: int | None = None,
    tokens: int | dict[str, Any] | None = None,
    pretrained: str | Path | None = None,
    input_size: int | tuple[int, int] | None = None,
    in_chans: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **head_kwargs: Any,
) -> SelfExplainer:
    """Turn the classifier ``model`` into a self-explaining model with the ``method`` head.

    ``model``: an ``nn.Module`` (copied, the original is left as it is), or a name, ``"resnet18"`` /
    ``"torchvision:resnet18"`` / ``"timm:resnet10t"``, built with random weights and ``model_kwargs``;
    a run of a model given by name rebuilds itself, a run of your own module needs
    ``load_checkpoint(path, model=...)``. ``features`` / ``classifier``: module names (as in
    ``named_modules()``) instead of the rules of this module's docstring. ``num_classes``: the head's
    classes (default: the classifier's; another count gives a new, untrained linear layer). ``tokens``:
    for token models that are not timm's, the number of prefix tokens to drop, or ``{"prefix": P,
    "grid": [h, w]}``. ``pretrained``: a weights file or name loaded strictly into the model before it
    is wrapped (:func:`selfcam.load_pretrained`). ``input_size``: the probe's image size (default: the
    timm model's, else 224; a small size keeps the probe cheap but must leave ``h * w > 1``).
    ``in_chans``: default the first convolution's. ``head_kwargs`` go to the head.

    Returns a :class:`~selfcam.model.SelfExplainer` in ``model``'s train/eval mode, with
    ``wrap_info`` (:class:`WrapInfo`) and, after ``pretrained``, ``pretrained_report``.
    """
    if isinstance(model, str):
        from .pretrained import named_weights

        named = named_weights(pretrained)
        if named is not None and source_name(model) != named.backbone:
            raise ConfigError(f"pretrained {named.name!r} fits {named.backbone!r}, not {model!r}")
        module: nn.Module = named_model(model, dict(model_kwargs or {}))
    elif isinstance(model, nn.Module):
        if model_kwargs:
            raise ConfigError("model_kwargs build a model given by name; this model is already built")
        module = copy.deepcopy(model)
    else:
        raise ConfigError(f"wrap takes an nn.Module or a model name, got {type(model).__name__}")
    options = {"model_kwargs": _json_ready(dict(model_kwargs or {}), "model_kwargs"), "features": features,
               "classifier": classifier, "tokens": tokens_spec(tokens), "post": None, "route": None,
               "input_size": input_size, "pretrained": None if pretrained is None else str(pretrained)}  # fmt: skip
    return _wrap(module, method, source_name(model), options, num_classes, in_chans, head_kwargs, pretrained,
                 recorded=False)  # fmt: skip


def _wrap(module: nn.Module, method: str, source: str, options: dict[str, Any], num_classes: int | None,
          in_chans: int | None, head_kwargs: dict[str, Any], pretrained: Any, recorded: bool) -> SelfExplainer:  # fmt: skip
    report = None
    if pretrained is not None:
        from .pretrained import load_pretrained

        report = load_pretrained(module, pretrained)
    training = module.training
    chans = _in_chans(module, in_chans)
    size = _input_size(module, options["input_size"])
    param = next(module.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    x = torch.randn(2, chans, *size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    tokens = tokens_spec(options["tokens"])
    module.eval()
    timm_route = options["features"] is None and _is_timm(module) and options["route"] in (None, "timm")
    try:
        if timm_route:
            found, pre, tokens = _timm_route(module, x, tokens)
            route, stage_name = "timm", None
        else:
            found, calls = _find(module, x, options["features"], options["classifier"], tokens, num_classes is None)
    except ConfigError:
        raise
    except Exception as e:  # the probe pass itself failed: usually a wrong input size or channel count
        raise ConfigError(f"probe forward pass of {type(module).__name__} on {tuple(x.shape)} failed: "
                          f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]} "
                          "(set input_size= / in_chans=)") from e  # fmt: skip
    post_name, post, preserved, note = _choose_post(found, options["post"], recorded)
    if timm_route:
        if post_name and post_name.startswith("norm:"):
            _replace(module, post_name[5:], nn.Identity())  # it now lives in the backbone's PooledNorm
        module.reset_classifier(0)
        trunk: nn.Module = _TimmFeatures(module)
        parts, splittable = [*pre], False
    else:
        trunk, stage, splittable, route, stage_name = _generic_backbone(module, found, calls, x, options["route"])
        parts = ([stage] if stage is not None else []) + ([TokenGrid(tokens["prefix"], tokens["grid"])] if tokens else [])
    parts += [post] if post is not None else []
    last = parts[0] if len(parts) == 1 else nn.Sequential(*parts) if parts else nn.Identity()
    k = int(found.feats.shape[1])
    bb = Backbone(trunk, last, k, chans, splittable=splittable).to(device)
    bb.eval()
    with torch.no_grad():
        _, got = bb.forward_split(x)
        want = found.feats if post is None else post(found.feats)
    if not _close(got, want):
        raise ConfigError(f"cutting {type(module).__name__} at {found.features or 'forward_features'} did not give the "
                          f"features it computes (route {route}); name another module with features=")  # fmt: skip
    out_classes = getattr(found.classifier, "out_features", None)
    classes = num_classes if num_classes is not None else out_classes
    if classes is None:
        raise ConfigError(f"{type(module).__name__} has no linear classifier to take the class count from; give num_classes")
    head = make_head(method, bb, classes, dict(head_kwargs)).to(device, dtype)
    copied = init_classifier(head, found.classifier)
    if not copied and not note:
        note = f"the head's linear layer ({k} -> {classes}) has another shape than the classifier's: it starts untrained"
    preserved = preserved and copied
    if method == "plain" and not preserved and classes == out_classes and not recorded:
        warnings.warn(f"wrap: plain on {source} does not keep the model's predictions: {note}; "
                      "train the head (selfcam.fit) before trusting its logits", UserWarning, stacklevel=3)  # fmt: skip
    options = {**options, "features": found.features, "classifier": found.classifier_name, "tokens": tokens,
               "post": post_name, "route": route, "input_size": list(size)}  # fmt: skip
    config = ModelConfig(method, f"wrap:{source}", classes, chans, dict(head_kwargs), options)
    model = SelfExplainer(bb, head, config)
    model.wrap_info = WrapInfo(source, found.features, stage_name, found.classifier_name, route, post_name, tokens,
                               preserved, copied, note)  # fmt: skip
    if report is not None:
        model.pretrained_report = report
    return model.train(training)


def model_factory(spec: str, option: str = "--model-factory") -> Callable[[], nn.Module]:
    """The function ``spec`` (``"module:function"``, ``"package.module:Class"``, ``"module:obj.method"``) names.

    For the command line only, on text the user typed: selfcam never imports a name read out of a
    file. The current directory is searched first (as ``python -m`` does), then ``sys.path``. The
    module is imported (its code runs); the function is called later, with no arguments, to build the
    bare model. Anything that does not resolve to a callable is one :class:`ConfigError` line.
    """
    import importlib
    import os
    import sys

    module_name, sep, attr = str(spec).partition(":")
    if not (sep and module_name and attr) or not all(p.isidentifier() for p in (*module_name.split("."), *attr.split("."))):
        raise ConfigError(f"{option} {spec!r}: expected module:function, e.g. mymodels:build_net (a module on the "
                          "Python path or in the current directory, and a function in it returning the bare model)")  # fmt: skip
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or module_name
        where = "" if missing != module_name.split(".")[0] else " (not in the current directory nor on PYTHONPATH)"
        raise ConfigError(f"{option} {spec!r}: cannot import {module_name!r}: no module named {missing!r}{where}") from e
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing: say where, in one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{option} {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {first}") from e
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            have = ", ".join(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))[:200]
            raise ConfigError(f"{option} {spec!r}: {module_name}{':' if i == 0 else '.'}{'.'.join(attr.split('.')[:i])}"
                              f"{'.' if i else ''} has no {part!r} (callables there: {have or 'none'})".replace(":.", ":"))  # fmt: skip
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{option} {spec!r}: {attr} is a {type(obj).__name__}, not a function or class")
    return obj  # type: ignore[no-any-return]


def build_user_model(factory: Callable[[], Any], what: str = "model=") -> nn.Module:
    """``factory()``, the bare model of a user's class; one :class:`ConfigError` line when it fails or gives no module."""
    try:
        module = factory()
    except Exception as e:  # noqa: BLE001 - the user's constructor failed: say which and why, in one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{what}: calling {getattr(factory, '__qualname__', factory)!r} failed: {type(e).__name__}: {first}") from e
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{what} must return an nn.Module, {getattr(factory, '__qualname__', factory)!r} returned "
                          f"{type(module).__name__}")  # fmt: skip
    return module


def user_class(config: Any) -> str | None:
    """The class name of a run of :func:`wrap` on the user's own model (its config's backbone ``wrap:user:NAME``), else None."""
    backbone = getattr(config, "backbone", None)
    return backbone[len("wrap:user:"):] if isinstance(backbone, str) and backbone.startswith("wrap:user:") else None


def rebuild(config: ModelConfig, model: nn.Module | Callable[[], nn.Module] | None = None,
            pretrained: str | Path | None = None) -> SelfExplainer:  # fmt: skip
    """The wrapped model ``config`` (a ``wrap:...`` backbone) describes, with fresh weights.

    A model given by name is built again from its recorded builder and options. A run of your own
    class needs ``model``: a callable returning the bare model, or the module itself; selfcam never
    imports a class named in a file.
    """
    source = config.backbone.removeprefix("wrap:")
    options = dict(config.backbone_kwargs)
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise ConfigError(f"wrapped model options: unknown {sorted(unknown)} (known: {', '.join(_OPTIONS)})")
    options = {key: options.get(key) for key in _OPTIONS}
    options["model_kwargs"] = dict(options["model_kwargs"] or {})
    if pretrained is not None:  # create_model("...", "wrap:...", pretrained=...): a new run from a file
        options["pretrained"] = str(pretrained)
    if model is None:
        if source.startswith("user:"):
            cls = source[5:]
            raise ConfigError(f"this run wraps your own model class {cls!r}, and selfcam never imports a class named "
                              f"in a file: give the function that returns a bare {cls}, --model-factory module:function "
                              "on the command line, load_checkpoint(path, model=...) in Python")  # fmt: skip
        if not source.startswith(("timm:", "torchvision:")):
            raise ConfigError(f"unknown wrapped model source {source!r}")
        module = named_model(source, dict(options["model_kwargs"] or {}))
    elif isinstance(model, nn.Module):
        module = copy.deepcopy(model)
    elif callable(model):
        module = build_user_model(model)
    else:
        raise ConfigError(f"model= must be an nn.Module or a callable returning one, got {type(model).__name__}")
    return _wrap(module, config.method, source, options, config.num_classes, config.in_chans, dict(config.head_kwargs),
                 pretrained, recorded=True)  # fmt: skip
