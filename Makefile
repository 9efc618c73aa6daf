# Thin wrappers around scripts/ (the README's two commands).
.PHONY: setup test demo build paper-bench
setup:
	bash scripts/setup.sh
test:
	bash scripts/test.sh
build:
	bash scripts/fetch-qemu.sh && bash scripts/build.sh
demo:
	bash scripts/demo.sh
paper-bench:
	bash scripts/paper-bench.sh
