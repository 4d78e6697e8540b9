"""Run benchmark configurations: one model (or token mixer), input size, batch, mode and precision each.

On CPU every configuration runs in a fresh Python process (``python -m l2vit.bench.runner CONFIG_JSON``), so its
peak RSS is its own and a crash, an out-of-memory kill or a hang costs one row, not the sweep. On CUDA they run in
this process; the allocator's peak statistics are exact per call, and out-of-memory errors are caught.

Configurations marked ``paired`` are timed together instead: those that differ only in their model run in one
process (:func:`run_group`), alternating call by call (:func:`l2vit.bench.timing.time_interleaved`), so drift of the
machine between processes does not enter the ratios between models. They cannot measure peak memory (the models
share the process), so a paired configuration has ``memory=False``; a suite times a ratio both ways by listing the
same sweep with and without ``paired``.

A configuration's workload is a timm model on ``(B, 3, H, W)`` images (``kind='model'``, optionally an L²ViT with
another ``global_mixer``) or one registered token mixer alone on ``(B, H, W, dim)`` tokens (``kind='mixer'``, see
:mod:`l2vit.bench.mixers`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ['BenchConfig', 'run_config', 'run_group', 'run_sweep', 'model_cost', 'config_cost', 'DTYPES', 'KINDS',
           'STATUS_OK']

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
MODES = ('infer', 'train')
CASTS = ('autocast', 'model', 'none')
KINDS = ('model', 'mixer')
STATUS_OK = 'ok'
_RESULT_TAG = 'L2VIT_BENCH_RESULT '
_MIB = 2 ** 20


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration.

    Attributes:
        model: timm model name (``import l2vit`` registers ours), or for ``kind='mixer'`` a registered token mixer
            name (``l2vit.layers.list_mixers()``).
        height: Input height (pixels; tokens for a mixer).
        width: Input width (pixels; tokens for a mixer).
        batch: Batch size.
        mode: ``'infer'`` (forward under ``torch.inference_mode``) or ``'train'`` (forward, cross-entropy backward
            and an AdamW step).
        dtype: ``'fp32'``, ``'bf16'`` or ``'fp16'``.
        cast: How a half precision is applied: ``'autocast'`` (fp32 weights, ``torch.autocast``) or ``'model'``
            (weights and input cast to ``dtype``); ``'none'`` for fp32.
        device: ``'cpu'``, ``'cuda'``, ``'cuda:1'``, ...
        threads: CPU threads (``torch.set_num_threads``); None keeps PyTorch's default.
        compile: Wrap the model in ``torch.compile``.
        freeze: With ``compile``, for inference only: compile with the weights frozen into the graph
            (:func:`l2vit.export.compile_for_inference`; on CPU oneDNN prepacks them and fuses pointwise ops).
        channels_last: Put the model and input in channels-last memory format.
        warmup: Untimed calls before timing (after the call that measures memory).
        min_reps: Fewest timed calls.
        min_time: Fewest seconds of timed calls.
        max_time: No timed call starts after this many seconds once ``min_reps`` are done.
        memory: Measure the peak memory of the first call.
        kind: ``'model'`` (images into a timm model) or ``'mixer'`` (``(B, height, width, dim)`` tokens into one
            token mixer).
        global_mixer: For ``kind='model'``: passed to ``timm.create_model`` as ``global_mixer`` (an L²ViT with this
            mixer in its global blocks); None builds the model as registered.
        dim: For ``kind='mixer'``: token width (default 64).
        heads: For ``kind='mixer'``: attention heads (default 2).
        paired: Time this configuration in one process with the others of the sweep that differ from it only in
            ``model`` / ``global_mixer``, alternating call by call (see :func:`run_sweep`); needs ``memory=False``.
        keep_freed_memory: Run with glibc keeping large freed blocks for reuse
            (:func:`l2vit.engine.malloc.keep_freed_memory`, what l2vit's train / eval / predict commands do on CPU):
            a setting of the whole process, so give it to isolated configurations; a row that asks for it where it
            cannot be made (not glibc, or the environment configures the allocator) is recorded as unsupported.
    """
    model: str
    height: int
    width: int
    batch: int = 1
    mode: str = 'infer'
    dtype: str = 'fp32'
    cast: str = 'none'
    device: str = 'cpu'
    threads: int | None = None
    compile: bool = False
    freeze: bool = False
    channels_last: bool = False
    warmup: int = 2
    min_reps: int = 5
    min_time: float = 2.0
    max_time: float = 60.0
    memory: bool = True
    kind: str = 'model'
    global_mixer: str | None = None
    dim: int | None = None
    heads: int | None = None
    paired: bool = False
    keep_freed_memory: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got '{self.kind}'")
        if self.kind == 'mixer':
            # frozen dataclass: fill the mixer defaults in place
            object.__setattr__(self, 'dim', 64 if self.dim is None else self.dim)
            object.__setattr__(self, 'heads', 2 if self.heads is None else self.heads)
            if min(self.dim, self.heads) < 1:
                raise ValueError(f'dim and heads must be positive, got {self.dim}, {self.heads}')
            if self.global_mixer is not None:
                raise ValueError("global_mixer applies to kind 'model' only (a mixer config names its mixer in "
                                 "'model')")
            if self.channels_last:
                raise ValueError("channels_last applies to kind 'model' only (mixer inputs are (B, H, W, C))")
        elif self.dim is not None or self.heads is not None:
            raise ValueError(f"dim and heads apply to kind 'mixer' only, got dim={self.dim}, heads={self.heads} "
                             f"for kind 'model'")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got '{self.mode}'")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got '{self.dtype}'")
        if self.cast not in CASTS:
            raise ValueError(f"cast must be one of {CASTS}, got '{self.cast}'")
        if (self.dtype == 'fp32') != (self.cast == 'none'):
            raise ValueError(f"cast must be 'none' for fp32 and 'autocast' or 'model' otherwise, got dtype "
                             f"'{self.dtype}' with cast '{self.cast}'")
        if self.freeze and not (self.compile and self.mode == 'infer'):
            raise ValueError(f"freeze applies to compiled inference only (compile=True, mode='infer'), got "
                             f"compile={self.compile}, mode='{self.mode}'")
        if self.paired and self.memory:
            raise ValueError('a paired configuration shares its process with other models, so its peak memory '
                             'cannot be measured: set memory=False (time it unpaired too to measure memory)')
        if min(self.height, self.width, self.batch) < 1:
            raise ValueError(f'height, width and batch must be positive, got {self.height}, {self.width}, '
                             f'{self.batch}')

    def label(self) -> str:
        prec = self.dtype if self.dtype == 'fp32' else f'{self.dtype}-{self.cast}'
        compiled = (' compiled-frozen' if self.freeze else ' compiled') if self.compile else ''
        extra = compiled + (' channels-last' if self.channels_last else '') + (' paired' if self.paired else '')
        if self.kind == 'mixer':
            name = f'mixer {self.model} d{self.dim}h{self.heads}'
        else:
            name = self.model if self.global_mixer is None else f'{self.model}[{self.global_mixer}]'
        return f'{name} {self.height}x{self.width} b{self.batch} {self.mode} {prec} {self.device}{extra}'

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` beyond the input size (``kind='model'``)."""
        return {} if self.global_mixer is None else {'global_mixer': self.global_mixer}


class Unsupported(Exception):
    """The model cannot run this configuration (e.g. a fixed input size); recorded, not raised."""


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or 'out of memory' in text.lower())


def _model_kwargs(name: str, height: int, width: int) -> dict[str, Any]:
    """``img_size`` for timm models built for one input size (ViT, Swin); nothing for size-agnostic ones."""
    import timm
    cfg = timm.get_pretrained_cfg(name, allow_unregistered=True)
    if cfg is not None and cfg.fixed_input_size:
        return {'img_size': (height, width)}
    return {}


def create_model(name: str, height: int, width: int, **kwargs) -> torch.nn.Module:
    """A randomly initialised timm model that accepts ``height × width`` inputs, or :class:`Unsupported`."""
    import timm

    import l2vit  # noqa: F401 (registers the models)
    size_kwargs = _model_kwargs(name, height, width)
    try:
        return timm.create_model(name, pretrained=False, **size_kwargs, **kwargs)
    except TypeError as e:
        if size_kwargs:
            raise Unsupported(f'fixed input size: {name} does not accept img_size ({e})') from e
        raise


def model_cost(name: str, height: int, width: int, **kwargs) -> tuple[float | None, float | None]:
    """``(GMACs per image, parameters in millions)`` counted on the meta device; Nones where counting fails.

    ``kwargs`` go to ``timm.create_model`` (e.g. ``global_mixer``)."""
    try:
        model = create_model(name, height, width, device='meta', **kwargs)
    except Exception:  # noqa: BLE001 (a model that cannot be built here is reported by its run)
        return None, None
    return module_cost(model, (3, height, width))


def module_cost(module: torch.nn.Module, input_size: tuple[int, ...]) -> tuple[float | None, float | None]:
    """``(GMACs per input, parameters in millions)`` of ``module`` (on the meta device) for one input of
    ``input_size`` (batch dimension excluded); GMACs is None where counting fails."""
    from .macs import count_macs
    params = sum(p.numel() for p in module.parameters()) / 1e6
    try:
        macs = count_macs(module, input_size).total / 1e9
    except Exception:  # noqa: BLE001 (some ops have no meta kernel; MACs are then left blank)
        macs = None
    return macs, params


def config_cost(cfg: BenchConfig) -> tuple[float | None, float | None]:
    """``(GMACs per input, parameters in millions)`` of the workload of ``cfg`` (model or mixer)."""
    if cfg.kind == 'mixer':
        from .mixers import mixer_cost
        return mixer_cost(cfg.model, cfg.height, cfg.width, cfg.dim, cfg.heads)
    return model_cost(cfg.model, cfg.height, cfg.width, **cfg.model_kwargs())


def _cost_key(cfg: BenchConfig) -> tuple:
    return cfg.kind, cfg.model, cfg.height, cfg.width, cfg.global_mixer, cfg.dim, cfg.heads


def _workload(cfg: BenchConfig, device: torch.device
              ) -> tuple[torch.nn.Module, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(module, input, training loss of its output)`` for ``cfg``, on ``device``."""
    if cfg.kind == 'mixer':
        from .mixers import mixer_workload
        return mixer_workload(cfg, device)
    model = create_model(cfg.model, cfg.height, cfg.width, **cfg.model_kwargs()).to(device)
    x = torch.randn(cfg.batch, 3, cfg.height, cfg.width, device=device)
    target = torch.randint(0, 1000, (cfg.batch,), device=device)

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.float(), target % logits.shape[-1])
    return model, x, loss


def _step_fn(cfg: BenchConfig, model: torch.nn.Module, x: torch.Tensor,
             loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
    device = torch.device(cfg.device)
    amp = cfg.dtype != 'fp32' and cfg.cast == 'autocast'

    def autocast():
        if amp:
            return torch.autocast(device.type, dtype=DTYPES[cfg.dtype])
        return contextlib.nullcontext()

    if cfg.mode == 'infer':
        model.eval()

        def infer():
            with torch.inference_mode(), autocast():
                return model(x)
        return infer

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = model(x)
        loss = loss_fn(out)
        loss.backward()
        optimizer.step()
        return loss
    return train_step


def _prepare(cfg: BenchConfig, device: torch.device) -> Callable[[], object]:
    """Build the workload of ``cfg`` on ``device`` (seeded, cast, compiled as asked) and return its step."""
    torch.manual_seed(0)
    model, x, loss_fn = _workload(cfg, device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if cfg.dtype != 'fp32' and cfg.cast == 'model':
        model, x = model.to(DTYPES[cfg.dtype]), x.to(DTYPES[cfg.dtype])
    if cfg.freeze:
        from ..export import compile_for_inference
        model = compile_for_inference(model)
    elif cfg.compile:
        model = torch.compile(model)
    return _step_fn(cfg, model, x, loss_fn)


def _failed(row: dict[str, Any], e: Exception, device: torch.device) -> dict[str, Any]:
    """``row`` marked with why ``e`` ended the configuration: unsupported, out of memory or an error."""
    if isinstance(e, Unsupported):
        return {**row, 'status': 'unsupported', 'error': str(e)}
    if _is_oom(e):
        if device.type == 'cuda':
            torch.cuda.empty_cache()
        return {**row, 'status': 'oom', 'error': f'{type(e).__name__}: {str(e)[:300]}'}
    return {**row, 'status': 'error', 'error': f'{type(e).__name__}: {str(e)[:300]}'}


def _timed(row: dict[str, Any], cfg: BenchConfig, stats) -> dict[str, Any]:
    from ..layers.prepacked import routes_taken
    return {
        **row,
        # the GEMM route l2vit's CPU fast paths took in this process (measured per process; None: not used)
        'linear_route': routes_taken() if cfg.device.startswith('cpu') else None,
        'time_ms': stats.median * 1e3,
        'time_q25_ms': stats.q25 * 1e3,
        'time_q75_ms': stats.q75 * 1e3,
        'time_min_ms': stats.min * 1e3,
        'time_max_ms': stats.max * 1e3,
        'reps': stats.reps,
        'img_per_s': cfg.batch / stats.median,
    }


def _allocator(cfg: BenchConfig) -> None:
    """Make the process-wide allocator setting ``cfg`` asks for, or raise :class:`Unsupported` saying why not."""
    if cfg.keep_freed_memory:
        from ..engine.malloc import keep_freed_memory
        applied, why = keep_freed_memory()
        if not applied:
            raise Unsupported(f'keep_freed_memory: {why}')


def run_config(cfg: BenchConfig) -> dict[str, Any]:
    """Run one configuration in this process and return its result row (status ``'ok'`` or why not)."""
    from .memory import measure_peak_memory
    from .timing import time_callable
    row: dict[str, Any] = {'status': STATUS_OK, 'error': ''}
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    row['threads'] = torch.get_num_threads()
    device = torch.device(cfg.device)
    try:
        _allocator(cfg)
        fn = _prepare(cfg, device)
        if cfg.memory:
            try:
                mem = measure_peak_memory(fn, device)
                row.update(peak_mib=mem.peak / _MIB, baseline_mib=mem.baseline / _MIB, mem_method=mem.method)
            except OSError as e:
                row['mem_method'] = f'unavailable ({e})'
        stats = time_callable(fn, device, warmup=cfg.warmup, min_reps=cfg.min_reps, min_time=cfg.min_time,
                              max_time=cfg.max_time)
    except Exception as e:  # noqa: BLE001 (every failure becomes a row; the sweep goes on)
        return _failed(row, e, device)
    return _timed(row, cfg, stats)


def run_group(cfgs: list[BenchConfig]) -> list[dict[str, Any]]:
    """Time ``cfgs`` in this process, alternating call by call (:func:`l2vit.bench.timing.time_interleaved`), and
    return one result row per configuration.

    Each workload is built and called once (untimed) in turn; one that fails there gets its row (unsupported, oom,
    error) and the others are timed without it. The warm-up, repetition and time settings are the first
    configuration's (the configurations of a group differ only in their model).
    """
    from .timing import time_interleaved
    if not cfgs:
        return []
    first = cfgs[0]
    if first.threads:
        torch.set_num_threads(first.threads)
    device = torch.device(first.device)
    rows: list[dict[str, Any]] = [{'status': STATUS_OK, 'error': '', 'threads': torch.get_num_threads()}
                                  for _ in cfgs]
    try:
        _allocator(first)  # the group shares it: the pair key includes it
    except Unsupported as e:
        return [_failed(row, e, device) for row in rows]
    fns, live = [], []
    for i, cfg in enumerate(cfgs):
        try:
            fn = _prepare(cfg, device)
            fn()
        except Exception as e:  # noqa: BLE001 (recorded; the others are still timed)
            rows[i] = _failed(rows[i], e, device)
            continue
        fns.append(fn)
        live.append(i)
    if not fns:
        return rows
    try:
        stats = time_interleaved(fns, device, warmup=first.warmup, min_reps=first.min_reps,
                                 min_time=first.min_time, max_time=first.max_time)
    except Exception as e:  # noqa: BLE001 (one failing call spoils the alternation for all of them)
        for i in live:
            rows[i] = _failed(rows[i], e, device)
        return rows
    for i, st in zip(live, stats):
        rows[i] = _timed(rows[i], cfgs[i], st)
    return rows


def _run_isolated(cfgs: list[BenchConfig], timeout: float, memory_limit_mib: float | None = None
                  ) -> list[dict[str, Any]]:
    """Run ``cfgs`` in a fresh Python process (one configuration alone, or a paired group with :func:`run_group`);
    a kill (out of memory), crash or timeout becomes every configuration's row.

    ``memory_limit_mib`` makes the child cap its own data memory (``RLIMIT_DATA``: heap and private mappings, where
    tensors live) once it has started, so an allocation past it fails in the child and is recorded as ``'oom'``
    instead of driving the machine into its out-of-memory killer, which may pick another process.
    """
    env = dict(os.environ)
    threads = cfgs[0].threads
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    group = len(cfgs) > 1 or cfgs[0].paired
    spec = [dataclasses.asdict(c) for c in cfgs] if group else dataclasses.asdict(cfgs[0])
    cmd = [sys.executable, '-m', 'l2vit.bench.runner', json.dumps(spec)]
    if memory_limit_mib:
        cmd.append(str(int(memory_limit_mib * _MIB)))

    def every(row: dict[str, Any]) -> list[dict[str, Any]]:
        return [dict(row) for _ in cfgs]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return every({'status': 'timeout', 'error': f'no result within {timeout:.0f} s'})
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            result = json.loads(line[len(_RESULT_TAG):])
            return result if group else [result]
    if proc.returncode in (-9, 137):
        return every({'status': 'oom', 'error': 'killed (SIGKILL: out of memory?)'})
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return every({'status': 'error', 'error': f'exit code {proc.returncode}: ' + ' | '.join(tail)[-300:]})


def _pair_key(cfg: BenchConfig) -> tuple:
    """What the configurations of one paired group share: everything but the model."""
    fields = dataclasses.asdict(cfg)
    fields.pop('model')
    fields.pop('global_mixer')
    return tuple(sorted(fields.items()))


def run_sweep(
        configs: Iterable[BenchConfig],
        isolate: bool | None = None,
        timeout: float = 900.,
        on_result: Callable[[dict[str, Any]], None] | None = None,
        skip: Callable[[BenchConfig, list[dict[str, Any]]], str | None] | None = None,
        memory_limit_mib: float | None = None,
) -> list[dict[str, Any]]:
    """Run ``configs`` one after another and return their rows (config fields, cost, timing, memory, status).

    Paired configurations (``cfg.paired``) that differ only in their model form one group, run where its first
    member comes in the order (:func:`run_group`, in one fresh process on CPU); rows come in the order they ran.

    Args:
        configs: The configurations.
        isolate: One fresh process per configuration (default: on CPU, where peak RSS needs it).
        timeout: Seconds an isolated configuration may take before it is recorded as ``'timeout'`` (a paired
            group: this many per member).
        on_result: Called with each row as soon as it exists (progress output, incremental saving).
        skip: Called with each configuration and the rows so far before it runs; a returned reason records the
            configuration as ``'skipped'`` (with that reason) without running it (e.g.
            :class:`l2vit.bench.mixers.ScalingGuard`).
        memory_limit_mib: Data-memory cap of each isolated configuration (see ``_run_isolated``); None: no cap.
    """
    rows: list[dict[str, Any]] = []
    costs: dict[tuple, tuple[float | None, float | None]] = {}
    configs = list(configs)
    groups: dict[tuple, list[BenchConfig]] = {}
    for cfg in configs:
        if cfg.paired:
            groups.setdefault(_pair_key(cfg), []).append(cfg)
    done: set[tuple] = set()
    for cfg in configs:
        if cfg.paired:
            key = _pair_key(cfg)
            if key in done:
                continue
            done.add(key)
            members = groups[key]
        else:
            members = [cfg]
        use_subprocess = isolate if isolate is not None else torch.device(cfg.device).type == 'cpu'
        start = time.perf_counter()
        reasons = [skip(c, rows) if skip is not None else None for c in members]
        todo = [c for c, r in zip(members, reasons) if not r]
        if not todo:
            results = []
        elif use_subprocess:
            results = _run_isolated(todo, timeout * len(todo), memory_limit_mib)
        elif cfg.paired:
            results = run_group(todo)
        else:
            results = [run_config(todo[0])]
        wall = (time.perf_counter() - start) / max(len(todo), 1)
        ran = iter(results)
        for c, reason in zip(members, reasons):
            result = {'status': 'skipped', 'error': reason} if reason else next(ran)
            ckey = _cost_key(c)
            if ckey not in costs:
                costs[ckey] = config_cost(c)
            gmacs, params = costs[ckey]
            row = {
                **dataclasses.asdict(c),
                'pixels': c.height * c.width,
                'gmacs': gmacs,
                'params_m': params,
                **result,
                'wall_s': wall,
            }
            if c.kind == 'mixer':
                row['tokens'] = c.height * c.width
            if row['status'] == STATUS_OK and gmacs and c.mode == 'infer':
                row['gflops'] = 2 * gmacs * c.batch / (row['time_ms'] / 1e3)
            rows.append(row)
            if on_result is not None:
                on_result(row)
    return rows


def _worker_main(argv: list[str]) -> int:
    """``CONFIGS_JSON [DATA_LIMIT_BYTES]``: run one configuration (a JSON object) or a paired group (a list) and
    print the row(s) as one tagged JSON line: an object for one configuration, a list for a group."""
    spec = json.loads(argv[0])
    cfgs = [BenchConfig(**c) for c in (spec if isinstance(spec, list) else [spec])]
    if len(argv) > 1:  # later allocations past the cap fail here (recorded as 'oom'), not in the OOM killer
        import resource  # POSIX only, as is the cap
        limit = int(argv[1])
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    results = run_group(cfgs) if isinstance(spec, list) else [run_config(cfgs[0])]
    for result in results:
        for key, value in result.items():  # JSON has no NaN/inf
            if isinstance(value, float) and not math.isfinite(value):
                result[key] = None
    print(_RESULT_TAG + json.dumps(results if isinstance(spec, list) else results[0]), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(_worker_main(sys.argv[1:]))
