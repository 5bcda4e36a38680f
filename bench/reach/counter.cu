// A plain CUDA C program that knows nothing of warmstart (bench/nosdk.py checkpoints and restores it).
//
//   counter PORT MIB [--managed]
//
// Fills MIB MiB of device memory (cudaMalloc, or cudaMallocManaged with --managed) with a pattern, then
// serves 127.0.0.1:PORT: each connection gets "SUM COUNT\n", where SUM is a checksum computed on the GPU over
// the whole buffer and COUNT a device-side counter incremented by every request. A restored copy must answer
// the same SUM and the next COUNT.
#include <arpa/inet.h>
#include <cuda_runtime.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHECK(call)                                                                         \
    do {                                                                                    \
        cudaError_t e_ = (call);                                                            \
        if (e_ != cudaSuccess) {                                                            \
            fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(e_));              \
            exit(1);                                                                        \
        }                                                                                   \
    } while (0)

__global__ void fill(unsigned *buf, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        buf[i] = (unsigned)(i * 2654435761u) ^ 0x5bd1e995u;
}

__global__ void sum(const unsigned *buf, size_t n, unsigned long long *out, unsigned long long *count) {
    unsigned long long s = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        s += buf[i] * (unsigned long long)(i % 977 + 1);
    atomicAdd(out, s);
    if (blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(count, 1ULL);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: counter PORT MIB [--managed]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    size_t n = (size_t)atol(argv[2]) << 18;  // MiB of 4-byte words
    int managed = argc > 3 && strcmp(argv[3], "--managed") == 0;
    unsigned *buf;
    unsigned long long *acc;  // [0]: the sum of one request, [1]: the request counter
    if (managed) {
        CHECK(cudaMallocManaged(&buf, n * sizeof(unsigned)));
        CHECK(cudaMallocManaged(&acc, 2 * sizeof(unsigned long long)));
    } else {
        CHECK(cudaMalloc(&buf, n * sizeof(unsigned)));
        CHECK(cudaMalloc(&acc, 2 * sizeof(unsigned long long)));
    }
    CHECK(cudaMemset(acc, 0, 2 * sizeof(unsigned long long)));
    fill<<<1024, 256>>>(buf, n);
    CHECK(cudaDeviceSynchronize());

    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) {
        perror("bind/listen");
        return 1;
    }
    printf("serving on %d (%zu MiB, %s)\n", port, n >> 18, managed ? "managed" : "device");
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        unsigned long long host[2];
        CHECK(cudaMemset(acc, 0, sizeof(unsigned long long)));
        sum<<<1024, 256>>>(buf, n, acc, acc + 1);
        CHECK(cudaMemcpy(host, acc, sizeof host, cudaMemcpyDeviceToHost));
        char line[64];
        int len = snprintf(line, sizeof line, "%llu %llu\n", host[0], host[1]);
        if (write(c, line, len) != len) perror("write");
        close(c);
    }
}
