/* A libFuzzer target as a plain program: runs LLVMFuzzerTestOneInput once per
 * file named on the command line. The regression tests build the targets with
 * gcc and sanitizers this way (no clang needed) and feed them the inputs that
 * once crashed (tests/torture/regress/TARGET/). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int main(int argc, char **argv)
{
    LLVMFuzzerInitialize(&argc, &argv);
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) {
            perror(argv[i]);
            return 2;
        }
        uint8_t *buf = NULL;
        size_t len = 0, cap = 0, n;
        do {
            if (len == cap && !(buf = realloc(buf, cap = cap ? 2 * cap : 4096)))
                return 2;
            n = fread(buf + len, 1, cap - len, f);
            len += n;
        } while (n);
        fclose(f);
        LLVMFuzzerTestOneInput(buf, len);
        free(buf);
        printf("ok %s\n", argv[i]);
    }
    return 0;
}
