"""cffi API-mode builder for SG_IO (<scsi/sg.h>: layouts from the header)."""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    r"""
    typedef struct sg_io_hdr {
        int interface_id;
        int dxfer_direction;
        unsigned char cmd_len;
        unsigned char mx_sb_len;
        unsigned short iovec_count;
        unsigned int dxfer_len;
        void *dxferp;
        unsigned char *cmdp;
        unsigned char *sbp;
        unsigned int timeout;
        unsigned int flags;
        int pack_id;
        void *usr_ptr;
        unsigned char status;
        unsigned char masked_status;
        unsigned char msg_status;
        unsigned char sb_len_wr;
        unsigned short host_status;
        unsigned short driver_status;
        int resid;
        unsigned int duration;
        unsigned int info;
        ...;
    } sg_io_hdr_t;

    #define SG_IO ...
    #define SG_DXFER_NONE ...
    #define SG_DXFER_TO_DEV ...
    #define SG_DXFER_FROM_DEV ...
    #define SG_INFO_OK_MASK ...
    #define SG_INFO_OK ...

    int ioctl(int fd, unsigned long request, ...);
    """
)

ffibuilder.set_source(
    "dmsnap.scsi._sgffi",
    r"""
    #include <sys/ioctl.h>
    #include <scsi/sg.h>
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
