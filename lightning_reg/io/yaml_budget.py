"""YAML within budget: what jsonargparse reads as YAML (``--config`` files of every command line, config files
given to a flag, flag values such as ``--guidance '{method: cfg, scale: 1}'``) is measured before it is built.

``check_yaml_budget(text)`` walks the text's parser events (``yaml.parse``: no object is built) and counts the
nodes it expands to, an alias (``*name``) counting as the whole node its anchor (``&name``) marks. Past
``MAX_YAML_NODES`` nodes or ``MAX_YAML_BYTES`` bytes, or with an alias inside its own anchor's node, it is one
``ConfigError``, found in time and memory proportional to the text: an alias bomb of a few hundred bytes
expands to billions of nodes, which jsonargparse would walk for minutes and gigabytes. Within budget the text
is loaded as jsonargparse loads it. ``install_yaml_budget()`` makes this jsonargparse's YAML loader; each
command line calls it before building its parser.
"""

from __future__ import annotations

import yaml

from lightning_reg.errors import ConfigError

MAX_YAML_BYTES = 1 << 20  # the project's configs are a few KB
MAX_YAML_NODES = 100_000  # ~30x the largest config (a sweep's grid), far below what takes a second to walk


def check_yaml_budget(text: str, path=None) -> None:
    """Raise one ConfigError if ``text`` (read from ``path``, or a flag's value) is over the budget."""
    where = f"YAML file {path}" if path else "a YAML value"
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{where} has {size:,} bytes, over the {MAX_YAML_BYTES:,} a config may have; refused "
                          "(configs are read as plain data of bounded size)")
    nodes, sizes, open_nodes = 0, {}, []  # sizes: anchor -> its node's expanded size (None while it is open)
    for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        if isinstance(event, yaml.AliasEvent):
            if sizes.get(event.anchor, 1) is None:
                raise ConfigError(f"{where}: the alias *{event.anchor} lies inside the node &{event.anchor} marks, "
                                  "so it contains itself; refused (configs are read as plain data of bounded size)")
            nodes += sizes.get(event.anchor, 1)  # an undefined alias: yaml's own error when loading
        elif isinstance(event, yaml.ScalarEvent):
            nodes += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            nodes += 1
            open_nodes.append((event.anchor, nodes))
            if event.anchor:
                sizes[event.anchor] = None
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, start = open_nodes.pop()
            if anchor:
                sizes[anchor] = nodes - start + 1
        if nodes > MAX_YAML_NODES:
            raise ConfigError(f"{where} expands to more than {MAX_YAML_NODES:,} nodes once its aliases (*name: "
                              "the node &name marks) are repeated; refused (configs are read as plain data of "
                              "bounded size)")


def install_yaml_budget() -> None:
    """Make jsonargparse's YAML loader check ``check_yaml_budget`` first (once; later calls do nothing)."""
    from jsonargparse import get_loader, set_loader

    load = get_loader("yaml")
    if getattr(load, "within_budget", False):
        return

    def load_within_budget(text: str, path=None):
        check_yaml_budget(text, path)
        return load(text)

    load_within_budget.within_budget = True
    set_loader("yaml", load_within_budget, exceptions=(yaml.YAMLError,))
