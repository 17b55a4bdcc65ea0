"""Every tab's handlers under one name, for Python callers (tests, benchmarks, notebooks); the code lives in the tab
modules: `app.inspect_tab`, `app.inspect_probes`, `app.compare_tab`, `app.training`, with what they share in
`app.common`. Handlers are callable without a browser (pass a stand-in request with `session_hash`)."""
from app.common import (EXAMPLES_DIR, LAST, MEAN, MIN_BUDGET, N_MODEL_LISTS, RENDER_LOCK, examples,  # noqa: F401
                        layer_choices, max_budget, model_choices, pixel_budget, token_choices)
from app.compare_tab import RANK_HEADERS, compare_view, run_compare  # noqa: F401
from app.inspect_probes import explore_layer_choices, run_explored, run_levers  # noqa: F401
from app.inspect_tab import (SUMMARY_METRICS, cell_at, inspect_cell, inspect_summary, inspect_svg,  # noqa: F401
                             inspect_view, new_summary, run_inspect, summary_select)
