/* Wine 8.0 lacks ProcessPrng (added in Wine 8.13), which Rust's std imports from bcryptprimitives.dll:
 * without it every Rust .exe fails to start (c0000135). This stand-in fills the buffer from
 * RtlGenRandom (SystemFunction036, advapi32). Used only in throw-away Wine prefixes for tests; see
 * ../../shared/spec/windows-under-wine.md. Never shipped. */
#include <windows.h>
BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);
BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk)) return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
