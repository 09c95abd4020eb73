/* Test device for tests/isa_matrix.py: preloaded, it makes MKL's vendor check answer "Intel", so
 * that MKL runs the kernels it runs on Intel CPUs (AVX-512 where the CPU has it) on an AMD CPU.
 * Never used to serve. */
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_intel_cpu(void) { return 1; }
