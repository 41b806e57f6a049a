# Thin wrapper over CMake. The README's two commands: `make demo`, `make check`.
BUILD      ?= build
CHECK      ?= build-check
BENCHDIR   ?= build-bench
JOBS       ?= $(shell nproc)
CMAKE      ?= cmake

.PHONY: all demo check deps test bench install-check format format-check clean \
        check-valgrind check-tsan soak fuzz

all:
	$(CMAKE) -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DPP_TESTS=OFF >/dev/null
	$(CMAKE) --build $(BUILD) -j $(JOBS)

# Builds (optimised) and runs the examples tour.
demo: deps-build all
	./$(BUILD)/examples/tour

# Installs missing test dependencies (as root, through apt-get; Open MPI
# among them), builds with ASan + UBSan, runs every test (the MPI backend's
# under mpirun: CTest's mpi_*), the resource and threads tests without
# sanitizers, libFuzzer and ThreadSanitizer (scripts/check-reliability.sh),
# then checks that an outside program builds against the installed library
# through pkg-config.
check: deps
	$(CMAKE) -S . -B $(CHECK) -DCMAKE_BUILD_TYPE=Debug -DPP_SANITIZE=ON >/dev/null
	$(CMAKE) --build $(CHECK) -j $(JOBS)
	cd $(CHECK) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --output-on-failure -j $(JOBS)
	./scripts/check-reliability.sh
	$(MAKE) install-check

# Reliability (docs/reliability.md). check-valgrind: the suite under
# memcheck. check-tsan: the parent's threads under ThreadSanitizer (a
# stress program: Criterion's sandbox cannot start under TSan). soak: 20 million tasks with kills (not in CI). fuzz: every
# libFuzzer harness for FUZZ_SECONDS each (make check runs fuzz_ctl, 60 s).
FUZZ_SECONDS ?= 60
TSAN       ?= build-tsan

check-valgrind:
	@./scripts/deps.sh valgrind
	./scripts/check-valgrind.sh $(SUITES)

check-tsan:
	mkdir -p $(TSAN)
	clang -g -O1 -std=gnu11 -D_GNU_SOURCE -Wall -Wextra -Werror -fsanitize=thread \
	  -Iinclude -Isrc -o $(TSAN)/tsan_stress soak/tsan_stress.c src/*.c -lpthread -lm -ldl
	TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1" ./$(TSAN)/tsan_stress

soak: all
	$(CC) -O2 -std=gnu11 -Wall -Wextra -Werror -Iinclude -o $(BUILD)/soak soak/soak.c \
	  -L$(BUILD) -lprocpool -Wl,-rpath,$(abspath $(BUILD)) -lpthread
	./$(BUILD)/soak $(SOAK_ARGS)

fuzz:
	./fuzz/run.sh $(FUZZ_SECONDS) fuzz_ctl fuzz_queue

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
