"""The main job: ``snopt-dyn compare``, an interleaved optimizer comparison on vendored real data.

It depends on the engine (``snopt_dyn.wrap``, ``snopt_dyn.SNOpt``) and never the other way round.
Modules: :mod:`.runner` (the interleaved training), :mod:`.optimizers` (names -> torch optimizers),
:mod:`.verdict` (what "faster" means), :mod:`.summary` (numbers over seeds), :mod:`.table`, :mod:`.outputs` (CSV/JSON/PNG files), :mod:`.plots`,
:mod:`.progress`, :mod:`.cli`, and :mod:`.tasks` (one module per task).

Use from Python::

    from snopt_dyn.compare import compare, get_task, summarize, format_table
    result = compare(get_task("timeseries").prepare("cpu"), ["snopt", "adam", "sgd"], budget=30)
    print(format_table(result, summarize(result)))
"""
from .optimizers import BASELINES, FIRST_ORDER, OPTIMIZER_HELP, OPTIMIZER_NAMES, make_optimizer, parse_optimizer
from .outputs import CSV_COLUMNS, check_output_dir, write_outputs
from .plots import import_pyplot, plot_curves
from .runner import CompareResult, Run, compare, compare_seeds
from .summary import machine_info, summarize
from .table import format_table
from .tasks import TASKS, TUNING, Task, TaskError, get_task, load_series

__all__ = ["compare", "compare_seeds", "summarize", "format_table", "write_outputs", "plot_curves", "import_pyplot",
           "check_output_dir", "machine_info", "parse_optimizer", "make_optimizer", "Run", "CompareResult",
           "CSV_COLUMNS", "Task", "TaskError", "TASKS", "TUNING", "get_task", "load_series",
           "OPTIMIZER_NAMES", "BASELINES", "FIRST_ORDER", "OPTIMIZER_HELP"]
