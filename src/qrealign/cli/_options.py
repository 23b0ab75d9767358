"""Options a command accepts but the chosen mode would not read: an error, never silently dropped."""
from __future__ import annotations


def changed_options(args, defaults: dict, keep=frozenset(), flags: dict | None = None) -> list[str]:
    """The flags of the options in `defaults` (dest -> default) that `args` sets to another value,
    leaving out those in `keep` (the ones the mode reads); `flags` names dests whose flag is not
    `--dest-with-dashes` (e.g. {"eval_n": "--eval"})."""
    flags = flags or {}
    return [flags.get(name, "--" + name.replace("_", "-")) for name, default in defaults.items()
            if name not in keep and getattr(args, name) != default]
