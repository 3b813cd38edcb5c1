"""cffi API-mode builder for <linux/loop.h> and the block ioctls of <linux/fs.h>
(layouts and numbers from the headers)."""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    r"""
    struct loop_info64 {
        uint64_t lo_device;
        uint64_t lo_inode;
        uint64_t lo_rdevice;
        uint64_t lo_offset;
        uint64_t lo_sizelimit;
        uint32_t lo_number;
        uint32_t lo_flags;
        uint8_t lo_file_name[...];
        ...;
    };

    struct loop_config {
        uint32_t fd;
        uint32_t block_size;
        struct loop_info64 info;
        ...;
    };

    #define LO_NAME_SIZE ...
    #define LO_FLAGS_READ_ONLY ...
    #define LO_FLAGS_AUTOCLEAR ...
    #define LO_FLAGS_DIRECT_IO ...
    #define LOOP_SET_FD ...
    #define LOOP_CLR_FD ...
    #define LOOP_SET_STATUS64 ...
    #define LOOP_GET_STATUS64 ...
    #define LOOP_CONFIGURE ...
    #define LOOP_SET_CAPACITY ...
    #define LOOP_CTL_GET_FREE ...
    #define LOOP_CTL_REMOVE ...
    #define BLKZEROOUT ...
    #define BLKDISCARD ...

    int ioctl(int fd, unsigned long request, ...);
    """
)

ffibuilder.set_source(
    "dmsnap.storage._loopffi",
    r"""
    #include <sys/ioctl.h>
    #include <linux/loop.h>
    #include <linux/fs.h>
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
