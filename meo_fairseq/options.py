"""Every ``--moe-*`` option of the plugin's models, with its help: ``python -m meo_fairseq.options``.

fairseq handles ``--help`` before it adds a model's options, so
``fairseq-train --user-dir meo_fairseq --arch ... --help`` lists none of them. This prints them,
for every model of the plugin or for the model of one architecture::

    python -m meo_fairseq.options                       # every plugin model
    python -m meo_fairseq.options --arch meo_bart_large # the model behind one architecture
    python -m meo_fairseq.options --list-archs          # the plugin's models and architectures
"""

import argparse
import sys
import textwrap


def plugin_models() -> dict[str, list[str]]:
    """Returns: {registered model name: [its architectures]} for the models this plugin registers."""
    from fairseq.models import ARCH_MODEL_INV_REGISTRY, MODEL_REGISTRY

    import meo_fairseq  # noqa: F401  (registers the models)

    return {
        name: sorted(ARCH_MODEL_INV_REGISTRY.get(name, []))
        for name, cls in sorted(MODEL_REGISTRY.items())
        if cls.__module__.startswith("meo_fairseq.")
    }


def is_moe_option(action: argparse.Action) -> bool:
    return any(s.startswith(("--moe-", "--no-moe-")) for s in action.option_strings)


def moe_options(model: str) -> list[argparse.Action]:
    """The argparse actions of the ``--moe-*`` options that ``model`` adds to fairseq's parsers."""
    from fairseq.models import MODEL_REGISTRY

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    MODEL_REGISTRY[model].add_args(parser)
    return [action for action in parser._actions if is_moe_option(action)]


def default_of(action: argparse.Action):
    """The option's default: fairseq's model parsers drop dataclass defaults, so read MoEArgs."""
    from .models.moe_args import MoEArgs

    field = MoEArgs.__dataclass_fields__.get(action.dest)
    return field.default if field is not None else action.default


def describe(action: argparse.Action, width: int = 100) -> str:
    """One option as ``--flag {choices} (default: D)`` and its help, indented and wrapped."""
    head = ", ".join(action.option_strings)
    if action.nargs != 0:
        if action.choices:
            head += " {" + ",".join(map(str, action.choices)) + "}"
        else:
            head += " " + (action.type.__name__.upper() if action.type else "VALUE")
        default = default_of(action)
        if default is not None:
            head += f" (default: {default})"
    help_text = (action.help or "").replace("%%", "%")
    return head + "\n" + textwrap.fill(help_text, width, initial_indent="    ", subsequent_indent="    ")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m meo_fairseq.options",
        description="List the --moe-* options that fairseq-train/-generate/-eval-lm accept with "
        "--user-dir meo_fairseq (fairseq's own --help does not show them).",
    )
    p.add_argument("--arch", help="only the model of this architecture (e.g. meo_transformer_lm_gpt2_small)")
    p.add_argument("--list-archs", action="store_true", help="list the plugin's models and architectures")
    a = p.parse_args(argv)

    models = plugin_models()
    if a.list_archs:
        for model, archs in models.items():
            print(f"{model}: {', '.join(archs)}")
        return 0
    if a.arch:
        owner = [m for m, archs in models.items() if a.arch in archs]
        if not owner:
            known = ", ".join(arch for archs in models.values() for arch in archs)
            p.error(f"--arch {a.arch}: not an architecture of this plugin (known: {known})")
        names = owner
    else:
        names = list(models)
    for i, model in enumerate(names):
        if i:
            print()
        print(f"model {model} (architectures: {', '.join(models[model])})\n")
        print("\n".join(describe(action) for action in moe_options(model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
