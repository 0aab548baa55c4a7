"""A three-stage case pipeline: preprocessing and export in background threads, prediction in the caller's.

nnU-Net's predictor overlaps reading/preprocessing (-npp workers) and export (-nps workers) with the GPU's
sliding window. Here the workers are threads: the torch preprocessing/export release the GIL, and threads
share the predictor (weights, plans) and the CUDA context without pickling anything. Memory is bounded: at
most `num_preprocess` cases are preprocessed ahead of the one being predicted, and at most `num_export` + 1
predicted cases wait for or run their export. With 0 workers a stage runs inline in the caller's thread,
so (0, 0) is the plain sequential loop.
"""
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Dict, List, Sequence, Tuple, Type, TypeVar

Item = TypeVar('Item')
Result = TypeVar('Result')


class CaseFailedError(RuntimeError):
    """A case failed in one stage of the pipeline; `case` and `stage` name where, `__cause__` is the error."""

    def __init__(self, case: str, stage: str, error: BaseException):
        super().__init__(f"case {case}: {stage} failed: {type(error).__name__}: {error}")
        self.case = case
        self.stage = stage


class _InlineExecutor:
    """The part of ThreadPoolExecutor used below, running each job at once in the caller's thread."""

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # stored like a pool would, raised by .result()
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _executor(workers: int, name: str):
    if workers < 0:
        raise ValueError(f"number of {name} workers must be >= 0, got {workers}")
    return ThreadPoolExecutor(workers, thread_name_prefix=f"gfscreen-{name}") if workers else _InlineExecutor()


def run_pipeline(items: Sequence[Item], names: Sequence[str], preprocess: Callable[[Item], object],
                 predict: Callable[[object], object], export: Callable[[object], Result],
                 num_preprocess: int = 0, num_export: int = 0,
                 skip: Tuple[Type[BaseException], ...] = ()) -> Tuple[List[Result], List[BaseException]]:
    """export(predict(preprocess(item))) for every item; predict runs in the caller's thread, in item order.

    Returns (results of the exported items in item order, errors of the skipped items). A preprocessing error
    of a type in `skip` skips that item (the others go on); any other error stops the pipeline: queued
    preprocessing is cancelled, running jobs and the exports of already predicted items finish, and
    CaseFailedError naming the item (names[i]) and the stage is raised.
    """
    if len(names) != len(items):
        raise ValueError(f"got {len(names)} names for {len(items)} items")
    pre_pool, export_pool = _executor(num_preprocess, 'preprocessing'), _executor(num_export, 'export')
    preprocessed: Dict[int, Future] = {}
    exporting: Deque[Tuple[int, Future]] = deque()
    results: Dict[int, Result] = {}
    skipped: List[BaseException] = []
    next_submit = 0

    def finish_oldest_export() -> None:
        i, future = exporting.popleft()
        try:
            results[i] = future.result()
        except Exception as e:
            raise CaseFailedError(names[i], 'export', e) from e

    try:
        for i in range(len(items)):
            while next_submit < len(items) and next_submit <= i + num_preprocess:
                preprocessed[next_submit] = pre_pool.submit(preprocess, items[next_submit])
                next_submit += 1
            try:
                prepared = preprocessed.pop(i).result()
            except skip as e:
                skipped.append(e)
                continue
            except Exception as e:
                raise CaseFailedError(names[i], 'preprocessing', e) from e
            try:
                predicted = predict(prepared)
            except Exception as e:
                raise CaseFailedError(names[i], 'prediction', e) from e
            del prepared
            while len(exporting) > num_export:
                finish_oldest_export()
            exporting.append((i, export_pool.submit(export, predicted)))
            del predicted
        while exporting:
            finish_oldest_export()
    finally:
        for future in preprocessed.values():
            future.cancel()
        pre_pool.shutdown(wait=True, cancel_futures=True)
        export_pool.shutdown(wait=True)
    return [results[i] for i in sorted(results)], skipped
