# Thin wrapper over CMake. The README's two commands: `make demo`, `make check`.
BUILD      ?= build
CHECK      ?= build-check
BENCHDIR   ?= build-bench
JOBS       ?= $(shell nproc)
CMAKE      ?= cmake

.PHONY: all demo check deps test bench install-check format format-check clean

all:
	$(CMAKE) -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DPP_TESTS=OFF >/dev/null
	$(CMAKE) --build $(BUILD) -j $(JOBS)

# Builds (optimised) and runs the examples tour.
demo: deps-build all
	./$(BUILD)/examples/tour

# Installs missing test dependencies (as root, through apt-get), builds with
# ASan + UBSan, runs every test, then checks that an outside program builds
# against the installed library through pkg-config.
check: deps
	$(CMAKE) -S . -B $(CHECK) -DCMAKE_BUILD_TYPE=Debug -DPP_SANITIZE=ON >/dev/null
	$(CMAKE) --build $(CHECK) -j $(JOBS)
	cd $(CHECK) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --output-on-failure -j $(JOBS)
	$(MAKE) install-check

install-check:
	./scripts/install-check.sh

deps-build:
	@./scripts/deps.sh build

deps:
	@./scripts/deps.sh check

bench: deps-build
	$(CMAKE) -S . -B $(BENCHDIR) -DCMAKE_BUILD_TYPE=Release -DPP_TESTS=OFF -DPP_BENCH=ON >/dev/null
	$(CMAKE) --build $(BENCHDIR) -j $(JOBS)
	./bench/run.sh $(BENCHDIR)

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

format-check:
	clang-format --dry-run -Werror $$(git ls-files '*.c' '*.h')

clean:
	rm -rf $(BUILD) $(CHECK) $(BENCHDIR)
