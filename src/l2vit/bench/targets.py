"""The project's performance targets (issue #4, §3 on CPU and §4 on GPU), checked against one results file.

Every target is a ratio between rows of the same run (same machine, same moment), so it carries over between
machines better than absolute numbers. A speed ratio between two models is taken from *paired* rows (the two models
timed in one process, alternating call by call) where the run has them, else from the separate-process rows; the
detail says which, and gives the other figure too when both exist. A target whose rows are missing from the run is
reported as not measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ['Target', 'evaluate_targets', 'format_targets']

REF = 'l2vit_tiny'
SWIN = 'swin_tiny_patch4_window7_224'
DEIT = 'deit_small_patch16_224'


@dataclass
class Target:
    """One target: ``value`` compared with ``bound`` (``>=`` unless ``upper``)."""
    name: str
    value: float | None
    bound: float
    upper: bool = False
    detail: str = ''

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.bound if self.upper else self.value >= self.bound


def _rows(rows, model, size, batch, mode='infer', dtype='fp32', cast=None, device_type='cpu', eager=True,
          paired=False, kept=False):
    """The successful rows matching the arguments; ``eager``: only those not compiled (and not channels-last);
    ``paired``: only rows timed paired with other models (else only rows timed in their own process); ``kept``:
    only rows run with glibc keeping freed memory (else only rows with its default settings: such rows are
    reported beside the targets, never judged)."""
    return [r for r in rows
            if r.get('status') == 'ok' and r['model'] == model and (r['height'], r['width']) == (size, size)
            and r['batch'] == batch and r['mode'] == mode and r['dtype'] == dtype
            and (cast is None or r.get('cast') == cast) and r['device'].split(':')[0] == device_type
            and not (eager and (r.get('compile') or r.get('channels_last'))) and bool(r.get('paired')) == paired
            and bool(r.get('keep_freed_memory')) == kept]


def _find(rows, model, size, batch, mode='infer', dtype='fp32', cast=None, device_type='cpu', paired=False):
    """The first eager row matching the arguments, or None."""
    found = _rows(rows, model, size, batch, mode, dtype, cast, device_type, paired=paired)
    return found[0] if found else None


def _speed_target(name, rows, model, other, size, batch, bound, mode='infer', dtype='fp32', device_type='cpu'):
    """``model`` ÷ ``other`` throughput: from paired rows where both exist (the other figure in the detail),
    else from the separate-process rows."""
    def ratio(paired):
        return _ratio(_find(rows, model, size, batch, mode, dtype, device_type=device_type, paired=paired),
                      _find(rows, other, size, batch, mode, dtype, device_type=device_type, paired=paired))
    together, apart = ratio(True), ratio(False)
    if together is not None:
        detail = 'paired in one process' + (f'; separate processes: {apart:.3f}' if apart is not None else '')
        return Target(name, together, bound, detail=detail)
    return Target(name, apart, bound, detail='separate processes' if apart is not None else '')


def _fastest(rows, model, size, batch, dtype):
    """The fastest inference row of ``model`` in ``dtype`` on the CPU, however it ran (eager, autocast, model cast,
    compiled, frozen), or None."""
    found = [r for r in _rows(rows, model, size, batch, dtype=dtype, eager=False) if r.get('img_per_s')]
    return max(found, key=lambda r: r['img_per_s']) if found else None


def _compiled(compile, freeze) -> str:
    return (', compiled with frozen weights' if freeze else ', compiled') if compile else ''


def _path(row) -> str:
    """How a row ran: precision and cast, compiled or frozen."""
    prec = row['dtype'] if row['dtype'] == 'fp32' else f'{row["dtype"]} {row.get("cast", "")}'.strip()
    layout = ', channels-last' if row.get('channels_last') else ''
    return prec + _compiled(row.get('compile'), row.get('freeze')) + layout


def _ratio(a, b, key='img_per_s'):
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


AGREEMENT = 0.99  # bf16 top-1 agreement with fp32 the issue asks for


def _report(prec, row):
    """The precision report of the bf16 path ``row`` ran (eager or frozen, same cast), or None: plain compiled
    paths are not checked."""
    frozen = bool(row.get('compile') and row.get('freeze'))
    if row.get('compile') and not frozen:
        return None
    return next((p for p in prec if p['cast'] == row.get('cast') and bool(p.get('freeze')) == frozen), None)


def _report_path(p) -> str:
    """How a precision report's bf16 path ran (it is frozen or eager, never plainly compiled)."""
    return p['cast'] + _compiled(p.get('freeze'), p.get('freeze'))


def _cpu_targets(rows, env) -> list[Target]:
    out = []
    for batch, bound in ((1, 1.0), (16, 1.15)):
        out.append(_speed_target(f'fp32 224² batch {batch}: {REF} ÷ Swin-T throughput', rows, REF, SWIN, 224,
                                 batch, bound))
    r16 = _find(rows, REF, 224, 16)
    gemm = (env.get('gemm_gflops') or {}).get('fp32')
    eff = r16['gflops'] / gemm if r16 and r16.get('gflops') and gemm else None
    detail = f'{r16["gflops"]:.0f} of {gemm:.0f} GFLOP/s' if eff is not None else ''
    kept = [r for r in _rows(rows, REF, 224, 16, kept=True) if r.get('gflops')]
    if eff is not None and kept:  # the same forward with glibc keeping freed memory, as l2vit's commands run it
        detail += f'; with freed memory kept for reuse: {kept[0]["gflops"] / gemm:.3f}'
    out.append(Target(f'fp32 224² batch 16: {REF} share of the fp32 GEMM rate', eff, 0.70, detail=detail))
    # The issue asks for one bf16 inference path that is both fast and faithful: the path judged is the fastest one
    # whose top-1 agreement was checked and reaches the bound, else the fastest one. Its speed is divided by our
    # fastest fp32 path (a slow fp32 path must not flatter the ratio); every path's agreement is listed.
    prec = [p for p in env.get('precision', []) if p.get('model') == REF and p.get('dtype') == 'bf16']
    bf16_rows = sorted(_rows(rows, REF, 224, 16, dtype='bf16', eager=False), key=lambda r: -(r.get('img_per_s') or 0))
    agreeing = [r for r in bf16_rows if (_report(prec, r) or {}).get('top1_agreement', 0) >= AGREEMENT]
    bf16 = agreeing[0] if agreeing else (bf16_rows[0] if bf16_rows else None)
    fp32 = _fastest(rows, REF, 224, 16, 'fp32')
    ratio = _ratio(bf16, fp32)
    detail = f'{_path(bf16)} ÷ {_path(fp32)}' if ratio is not None else ''
    if ratio is not None and bf16 is not bf16_rows[0]:
        detail += f'; fastest bf16 path {_path(bf16_rows[0])}: {_ratio(bf16_rows[0], fp32):.3f}'
    if env.get('cpu_bf16') == 'none':
        detail += ('; ' if detail else '') + 'this CPU has no bf16 matrix kernels in oneDNN (cpu_bf16: none)'
    out.append(Target(f'bf16 224² batch 16: {REF} ÷ its fp32 throughput', ratio, 2.5, detail=detail))
    if prec:
        p = _report(prec, bf16) if bf16 is not None else None
        which = 'the path above' if p else 'worst path (the path above was not checked)'
        p = p or min(prec, key=lambda p: p['top1_agreement'])
        others = ', '.join(f'{_report_path(q)} {q["top1_agreement"]:.3f}' for q in prec)
        out.append(Target(f'bf16 top-1 agreement with fp32 ({p["images"]} photos, {p["weights"]} weights)',
                          p['top1_agreement'], AGREEMENT,
                          detail=f'{which}: {_report_path(p)}; decisive images {p["decisive_images"]}: '
                                 f'{p["decisive_agreement"]}; max |Δlogit| {p["max_abs_error"]:.3g} '
                                 f'({100 * p["rel_error"]:.2f}% of max |logit|); every path: {others}'))
    elif env.get('precision_skipped'):
        out.append(Target('bf16 top-1 agreement with fp32', None, AGREEMENT,
                          detail=f'not checked: {env["precision_skipped"]}'))
    m512, m1024 = _find(rows, REF, 512, 1), _find(rows, REF, 1024, 1)
    out.append(Target(f'fp32 batch 1: {REF} peak memory 1024² ÷ 512²', _ratio(m1024, m512, 'peak_mib'), 4.5,
                      upper=True))
    out.append(Target(f'fp32 1024² batch 1: {REF} ÷ Swin-T peak memory', _ratio(
        m1024, _find(rows, SWIN, 1024, 1), 'peak_mib'), 1.0, upper=True))
    out.append(_speed_target(f'fp32 1024² batch 1: {REF} ÷ DeiT-S throughput', rows, REF, DEIT, 1024, 1, 2.0))
    out.append(_speed_target(f'training step 224² batch 16: {REF} ÷ Swin-T', rows, REF, SWIN, 224, 16, 1.0,
                             mode='train'))
    return out


def _gpu_targets(rows) -> list[Target]:
    out = []
    sizes = sorted({r['height'] for r in rows if r['device'].startswith('cuda') and r['height'] == r['width']})
    for size in sizes:
        for batch in sorted({r['batch'] for r in rows if r['height'] == size and r['device'].startswith('cuda')}):
            seen = [_find(rows, m, size, batch, dtype='bf16', device_type='cuda', paired=p)
                    for m in (REF, SWIN) for p in (False, True)]
            if any(seen):
                out.append(_speed_target(f'GPU bf16 {size}² batch {batch}: {REF} ÷ Swin-T', rows, REF, SWIN, size,
                                         batch, 1.0, dtype='bf16', device_type='cuda'))
        if size == 1024:
            for batch in sorted({r['batch'] for r in rows if r['height'] == 1024 and r['device'].startswith('cuda')}):
                out.append(_speed_target(f'GPU bf16 1024² batch {batch}: {REF} ÷ DeiT-S', rows, REF, DEIT, 1024,
                                         batch, 3.0, dtype='bf16', device_type='cuda'))
    return out


def evaluate_targets(rows: list[dict[str, Any]], environment: dict[str, Any]) -> list[Target]:
    """The targets that apply to the devices present in ``rows``."""
    devices = {r['device'].split(':')[0] for r in rows}
    out = []
    if 'cpu' in devices:
        out += _cpu_targets(rows, environment)
    if 'cuda' in devices:
        out += _gpu_targets(rows)
    return out


def format_targets(targets: list[Target]) -> str:
    """A Markdown table of the targets: value, bound, verdict."""
    lines = ['| target | measured | bound | verdict |', '|---|---|---|---|']
    for t in targets:
        value = '—' if t.value is None else f'{t.value:.3f}'
        verdict = {True: 'met', False: '**missed**', None: 'not measured'}[t.passed]
        detail = f' ({t.detail})' if t.detail else ''
        lines.append(f'| {t.name}{detail} | {value} | {"≤" if t.upper else "≥"} {t.bound:g} | {verdict} |')
    return '\n'.join(lines)
