# coopt -- one Makefile for the library, the `coopt` binary, the tests and the fuzz targets.
#
#   make            build/coopt, build/coopt-test, build/libcoopt.a (optimized, -march=native)
#   make test       install missing system packages, build with ASan+UBSan, run every test
#   make check      `make test` plus the optimized build's tests
#   make fuzz       libFuzzer targets in build-fuzz/ (clang)
#   make CUDA=0     CPU-only build even when nvcc is present
#   make V=1        show every command

BUILD   ?= build
CC      ?= cc
NVCC    ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA    ?= $(if $(NVCC),1,0)
CUARCH  ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

OPT     ?= -O3 -march=native
CFLAGS  ?= $(OPT) -g
CFLAGS  += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wpointer-arith -Wno-unused-parameter -Werror \
           -pthread -MMD -MP -Iinclude -Isrc
BASE_LDLIBS := -lcjson -lm -lpthread
LDLIBS  += $(BASE_LDLIBS)
CUFLAGS ?= -O3 -lineinfo $(CUARCH)
CUFLAGS += -std=c++17 -Iinclude -Isrc -Xcompiler -Wall,-Wextra,-Wno-unused-parameter -MMD -MP

ifeq ($(V),1)
  Q :=
else
  Q := @
endif

SRC     := $(wildcard src/*.c src/cpu/*.c)
CU_SRC  :=
ifeq ($(CUDA),1)
  CU_SRC  := $(wildcard src/cuda/*.cu)
endif
ifneq ($(CU_SRC),)
  CFLAGS  += -DCOOPT_CUDA
  CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
  LDLIBS  += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lcublas -lstdc++  # driver API via cudaGetDriverEntryPoint: no libcuda at link time
endif
APP_SRC  := $(wildcard apps/*.c)
TEST_SRC := $(wildcard tests/*.c)

OBJ      := $(SRC:%=$(BUILD)/%.o) $(CU_SRC:%=$(BUILD)/%.o)
APP_OBJ  := $(APP_SRC:%=$(BUILD)/%.o)
TEST_OBJ := $(TEST_SRC:%=$(BUILD)/%.o)

.PHONY: all test check fuzz clean deps format run-demo
all: $(BUILD)/coopt $(BUILD)/coopt-test

$(BUILD)/libcoopt.a: $(OBJ)
	$(Q)rm -f $@ && ar rcs $@ $^

$(BUILD)/coopt: $(APP_OBJ) $(BUILD)/libcoopt.a
	$(Q)$(CC) $(CFLAGS) -o $@ $(APP_OBJ) $(BUILD)/libcoopt.a $(LDFLAGS) $(LDLIBS)

$(BUILD)/coopt-test: $(TEST_OBJ) $(BUILD)/libcoopt.a
	$(Q)$(CC) $(CFLAGS) -o $@ $(TEST_OBJ) $(BUILD)/libcoopt.a $(LDFLAGS) $(LDLIBS)

$(BUILD)/%.c.o: %.c
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(Q)$(NVCC) $(CUFLAGS) -c $< -o $@

# System packages the build needs (Debian). Installs only what is missing; needs root.
DEB_PKGS := build-essential libcjson-dev clang
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; fi

# Sanitized build + all tests (ASan, UBSan). CUDA objects are left out of the sanitized build;
# the CUDA tests run in the optimized build (`make check`) and under compute-sanitizer.
ASAN_FLAGS := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -march=native
test: deps
	$(Q)$(MAKE) --no-print-directory BUILD=build-asan CUDA=0 OPT="$(ASAN_FLAGS)" LDFLAGS="-fsanitize=address,undefined" build-asan/coopt-test build-asan/coopt
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 ./build-asan/coopt-test

check: test
	$(Q)$(MAKE) --no-print-directory all
	./$(BUILD)/coopt-test

run-demo: deps all
	./$(BUILD)/coopt run -m "$${COOPT_MODELS:-../shared/models}/stories260K.gguf" -p "Once upon a time" -n 128 --temp 0

FUZZ_TARGETS := $(patsubst fuzz/%.c,build-fuzz/%,$(wildcard fuzz/fuzz_*.c))
fuzz: deps
	$(Q)$(MAKE) --no-print-directory BUILD=build-fuzz CC=clang CUDA=0 \
	    OPT="-O1 -g -fsanitize=fuzzer-no-link,address,undefined" build-fuzz/libcoopt.a
	$(Q)$(MAKE) --no-print-directory $(FUZZ_TARGETS)
build-fuzz/fuzz_%: fuzz/fuzz_%.c fuzz/fuzz_util.h build-fuzz/libcoopt.a
	$(Q)clang -O1 -g -fsanitize=fuzzer,address,undefined -std=c11 -D_GNU_SOURCE -Iinclude -Isrc $< build-fuzz/libcoopt.a -o $@ $(BASE_LDLIBS)

format:
	clang-format -i include/*.h src/*.[ch] src/cpu/*.[ch] apps/*.c tests/*.[ch] $(wildcard src/cuda/*.cu src/cuda/*.cuh fuzz/*.c)

clean:
	rm -rf build build-asan build-fuzz

-include $(OBJ:.o=.d) $(APP_OBJ:.o=.d) $(TEST_OBJ:.o=.d)
