"""Great Expectations, run the one way sftflow runs it: a pandas frame checked whole against a suite in an
ephemeral, in-memory context (no project folder, no analytics, no progress bars). validate checks the raw
data with it, align the preference file (`tasks.core.preferences`)."""

from __future__ import annotations

import logging
from typing import Any

# GE logs its own import and set-up (decorated closures, data sources) at INFO; the stages log what matters.
logging.getLogger("great_expectations").setLevel(logging.WARNING)


def run_suite(
    frame: Any, expectations: list[Any], *, suite: str, source: str, asset: str, result_format: dict[str, Any] | None = None
) -> Any:
    """Validate a pandas frame with an expectation suite in an ephemeral Great Expectations context.

    Args:
        frame: the pandas frame, validated whole (batch definition `all_<asset>`).
        expectations: the suite's expectations.
        suite: the suite's name (in the result).
        source: the pandas data source's name.
        asset: the dataframe asset's name.
        result_format: GE's result format; None for its default (SUMMARY).

    Returns:
        The `ExpectationSuiteValidationResult`.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
        ),
    )
    batch = (
        context.data_sources.add_pandas(source)
        .add_dataframe_asset(asset)
        .add_batch_definition_whole_dataframe(f"all_{asset}")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    gx_suite = gx.ExpectationSuite(name=suite, expectations=expectations)
    return batch.validate(gx_suite) if result_format is None else batch.validate(gx_suite, result_format=result_format)
