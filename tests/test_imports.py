"""The import graph of slmjax/ is one-way (no circle) and every import is at module level, except the
deliberate lazy ones listed here with their reason."""

import ast
import graphlib
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / 'slmjax'
LAZY = {('slmjax.report', 'slmjax.plots')}  # the text report imports matplotlib only when it draws


def module_name(path: pathlib.Path) -> str:
  name = '.'.join(path.relative_to(ROOT.parent).with_suffix('').parts)
  return name.removesuffix('.__init__')


def imported(node, package: str) -> list[str]:
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name.startswith('slmjax')]
  if not isinstance(node, ast.ImportFrom):
    return []
  if node.level:  # relative, inside a package
    base = package.rsplit('.', node.level - 1)[0] if node.level > 1 else package
    return [f'{base}.{node.module}' if node.module else base]
  if node.module == 'slmjax':
    return [f'slmjax.{a.name}' for a in node.names]
  return [node.module] if node.module.startswith('slmjax') else []


def graph() -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
  modules = {module_name(p): p for p in ROOT.rglob('*.py')}
  edges, inner = {}, set()
  for name, path in modules.items():
    tree = ast.parse(path.read_text())
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    top = set(map(id, tree.body))
    edges[name] = set()
    for node in ast.walk(tree):
      for target in imported(node, package):
        target = target if target in modules else target.rpartition('.')[0]  # `from slmjax.x import name`
        if id(node) in top:
          edges[name].add(target)
        else:
          inner.add((name, target))
    edges[name].discard(name)
  return edges, inner


def test_no_import_circle():
  edges, _ = graph()
  order = list(graphlib.TopologicalSorter(edges).static_order())  # raises CycleError on a circle
  assert {'slmjax.config', 'slmjax.train', 'slmjax.dispatch'} <= set(order)


def test_no_function_level_imports_but_the_deliberate_ones():
  _, inner = graph()
  assert inner == LAZY


def test_model_code_does_not_import_the_mesh_code():
  edges, _ = graph()
  for module in ('slmjax.layers', 'slmjax.moe', 'slmjax.model', 'slmjax.dispatch.gather', 'slmjax.dispatch.einsum'):
    assert 'slmjax.sharding' not in edges[module], module
