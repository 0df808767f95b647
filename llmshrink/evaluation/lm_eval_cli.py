"""``llmshrink-lm-eval``: lm-eval's own command line, with the ``llmshrink`` model registered.

lm-evaluation-harness has no plugin hook for models, so ``lm_eval --model
llmshrink`` cannot find ours by itself; this runs the very same CLI after
importing the adapter::

    llmshrink-lm-eval --model llmshrink --model_args path=bundles/int4 --tasks arc_easy_local --include_path tasks/
"""

from __future__ import annotations


def main() -> None:
    from llmshrink.evaluation.harness import require_lm_eval

    try:
        require_lm_eval()
    except Exception as e:  # no lm-eval: say how to get it, as `llmshrink eval` does
        raise SystemExit(f"error: {e}") from None
    from lm_eval.__main__ import cli_evaluate

    import llmshrink.evaluation.lm_eval_adapter  # noqa: F401  (registers the "llmshrink" model)

    cli_evaluate()


if __name__ == "__main__":
    main()
