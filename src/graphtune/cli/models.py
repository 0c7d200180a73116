"""`graphtune models`: the registered models, their options and (with --profile) their costs."""

from __future__ import annotations

import click

from graphtune.cli import cli, load_params, params_option, user_errors


@cli.command("models")
@click.option("--profile", "profile_city", default=None,
              help="also build every model for this city and print parameters, FLOPs and transfer share.")
@click.option("--to", "target_city", default=None, help="with --profile: the city to measure transfer to.")
@params_option
@user_errors
def models_cmd(profile_city, target_city, params_path):
    """List the registered models and their default options (with --profile: their costs)."""
    from graphtune.models import list_models, model_defaults

    params = load_params(params_path, optional=True)  # its `cities:` (for --profile); a named file must exist
    if not profile_city:
        for name in list_models():
            opts = ", ".join(f"{k}={v}" for k, v in model_defaults(name).items())
            click.echo(f"{name:10s} {opts}")
        return
    from graphtune.transfer.experiment import load_bundles
    from graphtune.profiling import profile_models

    bundles = load_bundles(params, [profile_city] + ([target_city] if target_city else []))
    rows = profile_models(bundles[0], bundles[1] if target_city else None)
    header = f"{'model':10s} {'params':>10s} {'MB':>7s} {'GFLOPs/batch':>13s} {'thop GMACs':>11s}"
    click.echo(header + (f" {'transfer to ' + target_city:>24s}" if target_city else ""))
    for r in rows:
        thop = "-" if r["thop_macs"] is None else f"{r['thop_macs'] / 1e9:.3f}"
        line = f"{r['model']:10s} {r['params_total']:>10,d} {r['size_mb']:>7.2f} {r['flops'] / 1e9:>13.3f} {thop:>11s}"
        if target_city:
            line += f" {r['transfer_share']:>24.1%}"
        click.echo(line)


