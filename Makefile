# routerlib: the two commands users need, plus helpers.
.PHONY: test report gpu lint env docs

test:            ## run the test suite (CPU: kernels under TRITON_INTERPRET=1, notebooks executed)
	bash scripts/test.sh

report:          ## execute the notebooks in order and write the report under build/report/
	bash scripts/report.sh

gpu:             ## on a GPU machine: GPU tests, correctness sweep and benchmarks into $$OUT
	bash scripts/gpu_run.sh

docs:            ## the API reference and design notes (mkdocs, strict: a warning fails) into build/docs/
	bash -c 'source scripts/env.sh && NO_MKDOCS_2_WARNING=1 $$PY -m mkdocs build --strict'

lint:
	bash -c 'source scripts/env.sh && $$PY -m ruff check routerlib tests'

env:
	bash -c 'source scripts/env.sh'
