"""The package layout the README describes: training and inference never import each other, the product never
imports the lab beside it, and files stay small enough to read (over MAX_LINES only with the reason stated at
the top of the file)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nnunetv2_gfscreen"
LAB = PACKAGE.parent / "gfscreen_lab"
MAX_LINES = 300
WINGS = ("trainers", "predictors")


def _imported_modules(path: Path):
    """Every module an import statement in `path` names (also imports inside functions)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_training_and_inference_do_not_import_each_other():
    arrows = []
    for wing in WINGS:
        other = [w for w in WINGS if w != wing][0]
        for path in sorted((PACKAGE / wing).rglob("*.py")):
            for module in _imported_modules(path):
                if module.startswith(f"nnunetv2_gfscreen.{other}"):
                    arrows.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not arrows, arrows


def test_core_imports_neither_wing():
    bad = [f"{p.relative_to(PACKAGE)} imports {m}" for p in sorted((PACKAGE / "core").rglob("*.py"))
           for m in _imported_modules(p) if m.startswith(tuple(f"nnunetv2_gfscreen.{w}" for w in WINGS))]
    assert not bad, bad


def test_product_never_imports_the_lab():
    """gfscreen_lab (demo, experiments, synthetic data, short trainers) is not installed: an import of it from
    the product would fail for every user of the wheel."""
    assert LAB.is_dir() and not (PACKAGE / "experiments").exists() and not (PACKAGE / "synthetic").exists()
    bad = [f"{p.relative_to(PACKAGE)} imports {m}" for p in sorted(PACKAGE.rglob("*.py"))
           for m in _imported_modules(p) if m == "gfscreen_lab" or m.startswith("gfscreen_lab.")]
    assert not bad, bad


def test_long_files_say_why_at_the_top():
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted(LAB.rglob("*.py")):
        text = path.read_text()
        n = text.count("\n")
        head = (ast.get_docstring(ast.parse(text)) or "").lower()
        if n > MAX_LINES and "longer than" not in head:
            unexplained.append(f"{path.relative_to(PACKAGE.parent)}: {n} lines")
    assert not unexplained, unexplained


def test_the_gate_decision_exists_once():
    """Outside core/gate.py no module compares a score with a gate's threshold attribute (`x > net.gate.threshold`,
    `p > self.threshold`): every path decides through core.gate (select_tiles / decide)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() == "core/gate.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Gt, ast.GtE, ast.Lt, ast.LtE))
                                                     for op in node.ops):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Attribute) and s.attr == "threshold" for s in sides):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders
    gate = (PACKAGE / "core" / "gate.py").read_text()
    assert "def select_tiles(" in gate and "def decide(" in gate
    users = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
             if "select_tiles" in p.read_text() or "decide(" in p.read_text()}
    assert {"core/network.py", "core/gated_window.py"} <= users
