/* zeroout DEVICE OFFSET LENGTH: BLKZEROOUT on a block device (byte offset and length,
 * decimal). The lab's guest has busybox only, whose blkdiscard has no -z; this is the
 * write-zeroes request the interop tests send through the kernel's DRBD device.
 *
 * No libc: raw x86_64 system calls, so that the static binary is a few KiB and travels to
 * the guest as base64 in one RPC script. Exit status 0 on success, 1 on a usage error,
 * 2 when open fails, 3 when the ioctl fails. */

#define SYS_write 1
#define SYS_open 2
#define SYS_ioctl 16
#define SYS_exit 60
#define O_WRONLY 1
#define BLKZEROOUT 0x127f /* _IO(0x12, 127) */

static long sys3(long n, long a, long b, long c)
{
	long r;
	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(n), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return r;
}

static unsigned long long parse(const char *s, int *ok)
{
	unsigned long long v = 0;
	*ok = *s != 0;
	for (; *s; s++) {
		if (*s < '0' || *s > '9') {
			*ok = 0;
			return 0;
		}
		v = v * 10 + (unsigned long long)(*s - '0');
	}
	return v;
}

static void die(int code, const char *msg, long len)
{
	sys3(SYS_write, 2, (long)msg, len);
	sys3(SYS_exit, code, 0, 0);
	for (;;)
		;
}

void start_c(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	unsigned long long range[2];
	int ok1, ok2;
	long fd;

	if (argc != 4)
		die(1, "usage: zeroout DEVICE OFFSET LENGTH\n", 36);
	range[0] = parse(argv[2], &ok1);
	range[1] = parse(argv[3], &ok2);
	if (!ok1 || !ok2)
		die(1, "zeroout: OFFSET and LENGTH are decimal\n", 39);
	fd = sys3(SYS_open, (long)argv[1], O_WRONLY, 0);
	if (fd < 0)
		die(2, "zeroout: open failed\n", 21);
	if (sys3(SYS_ioctl, fd, BLKZEROOUT, (long)range) < 0)
		die(3, "zeroout: BLKZEROOUT failed\n", 27);
	sys3(SYS_exit, 0, 0, 0);
}

/* The entry point: hand the initial stack (argc, argv) to start_c with the ABI's alignment. */
__asm__(".globl _start\n"
	"_start:\n"
	"  mov %rsp, %rdi\n"
	"  and $-16, %rsp\n"
	"  call start_c\n"
	"  hlt\n");
