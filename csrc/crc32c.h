/* crc32c (Castagnoli), csrc/crc32c.c: what the journal checksums its
 * superblocks and records with, exported for other checksums (the
 * replication stream) and tests. */
#ifndef DMSNAP_CRC32C_H
#define DMSNAP_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* crc32c (Castagnoli) as used on disk, by the fastest implementation on
 * this CPU (timed once: the SSE4.2 instruction or slicing-by-8 tables; a CPU
 * emulator runs the instruction slowly). jr_crc32c_impl names the one in
 * use ("sse4.2" or "slice8"). For tests: the byte-wise table version, and
 * each variant by number (0 byte-wise, 1 slicing-by-8, 2 SSE4.2, or the
 * byte-wise one where the CPU lacks it). */
uint32_t jr_crc32c(const void *buf, size_t len);
/* The running value over a buffer in pieces: start with ~0u, feed each
 * piece, invert the result (jr_crc32c of the whole). */
uint32_t jr_crc32c_update(uint32_t crc, const void *buf, size_t len);
uint32_t jr_crc32c_table(const void *buf, size_t len);
uint32_t jr_crc32c_variant(int which, const void *buf, size_t len);
const char *jr_crc32c_impl(void);

#endif
