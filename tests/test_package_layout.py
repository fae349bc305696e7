"""The package's shape, which a reader relies on to find things (docs/architecture.md): the root holds the entry
points only, imports point one way (entry points -> train -> evaluate -> run -> data -> base modules) with no circle,
every module does one job in at most 500 lines, and no function takes more than 8 positional parameters."""
import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = {"main", "solver", "prepare_data", "make_cohort", "baseline", "report"}
# the networks and loaders the seed's README names, at the root: what they may import is at their rank
ROOT_LIBRARY = {"model": 0, "diffusion_refiner": 0, "data_loader": 1}
ROOM_RANK = {"data": 1, "run": 2, "evaluate": 3, "train": 4}


def module_files():
    files = glob.glob(os.path.join(REPO, "brainomaly", "**", "*.py"), recursive=True)
    files += glob.glob(os.path.join(REPO, "*.py"))
    return {os.path.relpath(f, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__"): f for f in files}


def rank(module):
    parts = module.split(".")
    if parts[0] != "brainomaly":
        return 5 if module in ENTRY_POINTS else ROOT_LIBRARY[module]
    return ROOM_RANK[parts[1]] if len(parts) > 2 else 0  # brainomaly.X and the room packages themselves: base


def project_imports(path, modules):
    """The project modules a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return found


def import_graph():
    modules = module_files()
    packages = {m for m, f in modules.items() if f.endswith("__init__.py")}
    return {m: project_imports(f, modules) - packages - {m} for m, f in modules.items()}


def test_the_root_holds_only_the_entry_points_and_the_seeds_networks_and_loaders():
    root = {m for m, path in module_files().items() if os.path.dirname(path) == REPO}
    assert root == ENTRY_POINTS | set(ROOT_LIBRARY)


def test_imports_point_from_the_entry_points_down_to_the_base_modules():
    upward = [f"{m} (rank {rank(m)}) imports {d} (rank {rank(d)})"
              for m, deps in import_graph().items() for d in deps if rank(d) > rank(m)]
    assert not upward, upward


def test_no_module_imports_itself_back_through_a_circle():
    graph, state, circles = import_graph(), {}, []

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, circles


def test_every_module_is_at_most_500_lines():
    long = {m: n for m, f in module_files().items() if (n := len(open(f).read().splitlines())) > 500}
    assert not long, long


def test_no_function_takes_more_than_8_positional_parameters():
    crowded = []
    for module, path in module_files().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.posonlyargs + node.args.args]
                if names and names[0] in ("self", "cls"):
                    names = names[1:]
                if len(names) > 8:
                    crowded.append(f"{module}.{node.name}: {len(names)}")
    assert not crowded, crowded
