"""The package's shape: no import cycle among its modules (counting imports
inside functions), no module past ~450 lines, and each module's docstring
saying what it holds."""

import ast
import pathlib

import sae_jax

PACKAGE = pathlib.Path(sae_jax.__file__).parent
MAX_LINES = 450


def imports() -> dict:
  """{module: the sae_jax modules it imports anywhere in its file}."""
  names = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
  graph = {}
  for name in names:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    used = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sae_jax"):
        if node.module == "sae_jax":  # from sae_jax import x, y
          used |= {a.name for a in node.names if a.name in names}
        else:  # from sae_jax.x import y
          used.add(node.module.split(".")[1])
      elif isinstance(node, ast.Import):
        used |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sae_jax.")}
    graph[name] = used - {name}
  return graph


def cycle(graph: dict):
  """One import cycle as a list of modules, or None (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle():
  graph = imports()
  assert {"run", "spelling", "finish"} <= set(graph) and "model" in graph["gradients"]
  assert cycle(graph) is None, " -> ".join(cycle(graph))
  # The check finds a cycle where there is one.
  assert cycle(dict(graph, model=graph["model"] | {"gradients"})) is not None


def test_every_module_is_short_and_says_what_it_holds():
  for path in sorted(PACKAGE.glob("*.py")):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{path.name}: {len(text.splitlines())} lines"
    assert ast.get_docstring(ast.parse(text)), f"{path.name} has no docstring"
