/*
 * A PKCS#11 module that forwards to a real one (PKI_FAULT_TARGET, e.g. SoftHSM2) and can be
 * made to fail or hang on demand, to test how ca-server lives through an HSM outage:
 *
 *   PKI_FAULT_FILE absent, or not containing "fail"/"hang": calls pass through
 *   PKI_FAULT_FILE contains "fail": session, login, search, sign and RNG calls return
 *                                   CKR_DEVICE_REMOVED
 *   PKI_FAULT_FILE contains "hang": those calls block until the file changes
 *
 * Built by tests/server_support/mod.rs with the system C compiler; test scaffolding, never
 * shipped.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef struct { unsigned char major, minor; } CK_VERSION;

/* CK_FUNCTION_LIST: a version followed by the 68 PKCS#11 2.40 entry points in spec order. */
#define NFUNCS 68
typedef struct { CK_VERSION version; void *f[NFUNCS]; } FUNCTION_LIST;

enum { I_GET_FUNCTION_LIST = 3, I_OPEN_SESSION = 12, I_GET_SESSION_INFO = 15, I_LOGIN = 18,
       I_FIND_OBJECTS_INIT = 26, I_SIGN_INIT = 42, I_SIGN = 43, I_GENERATE_RANDOM = 64 };

#define CKR_GENERAL_ERROR 0x05UL
#define CKR_DEVICE_REMOVED 0x32UL

static FUNCTION_LIST *real;
static FUNCTION_LIST shim;

/* 0: pass through; 1: fail. Blocks while the file says "hang". */
static int fault(void) {
    const char *path = getenv("PKI_FAULT_FILE");
    if (!path) return 0;
    for (;;) {
        FILE *f = fopen(path, "r");
        if (!f) return 0;
        char buf[16] = {0};
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        if (n >= 4 && strncmp(buf, "hang", 4) == 0) { usleep(100 * 1000); continue; }
        return n >= 4 && strncmp(buf, "fail", 4) == 0;
    }
}

typedef CK_RV (*fn2)(CK_ULONG, void *);
typedef CK_RV (*fn3)(CK_ULONG, void *, CK_ULONG);
typedef CK_RV (*fn4)(CK_ULONG, CK_ULONG, void *, CK_ULONG);
typedef CK_RV (*fn5)(CK_ULONG, CK_ULONG, void *, void *, void *);
typedef CK_RV (*fn5s)(CK_ULONG, void *, CK_ULONG, void *, void *);
typedef CK_RV (*fn3k)(CK_ULONG, void *, CK_ULONG);

static CK_RV w_open_session(CK_ULONG slot, CK_ULONG flags, void *app, void *notify, void *out) {
    return fault() ? CKR_DEVICE_REMOVED : ((fn5)real->f[I_OPEN_SESSION])(slot, flags, app, notify, out);
}
static CK_RV w_get_session_info(CK_ULONG s, void *info) {
    return fault() ? CKR_DEVICE_REMOVED : ((fn2)real->f[I_GET_SESSION_INFO])(s, info);
}
static CK_RV w_login(CK_ULONG s, CK_ULONG user, void *pin, CK_ULONG len) {
    return fault() ? CKR_DEVICE_REMOVED : ((fn4)real->f[I_LOGIN])(s, user, pin, len);
}
static CK_RV w_find_objects_init(CK_ULONG s, void *tpl, CK_ULONG n) {
    return fault() ? CKR_DEVICE_REMOVED : ((fn3)real->f[I_FIND_OBJECTS_INIT])(s, tpl, n);
}
static CK_RV w_sign_init(CK_ULONG s, void *mech, CK_ULONG key) {
    return fault() ? CKR_DEVICE_REMOVED : ((fn3k)real->f[I_SIGN_INIT])(s, mech, key);
}
static CK_RV w_sign(CK_ULONG s, void *data, CK_ULONG len, void *sig, void *sig_len) {
    return fault() ? CKR_DEVICE_REMOVED : ((fn5s)real->f[I_SIGN])(s, data, len, sig, sig_len);
}
static CK_RV w_generate_random(CK_ULONG s, void *buf, CK_ULONG len) {
    return fault() ? CKR_DEVICE_REMOVED : ((fn3)real->f[I_GENERATE_RANDOM])(s, buf, len);
}

CK_RV C_GetFunctionList(FUNCTION_LIST **out) {
    if (!real) {
        const char *target = getenv("PKI_FAULT_TARGET");
        void *h = target ? dlopen(target, RTLD_NOW | RTLD_LOCAL) : NULL;
        CK_RV (*get)(FUNCTION_LIST **) = h ? (CK_RV (*)(FUNCTION_LIST **))dlsym(h, "C_GetFunctionList") : NULL;
        if (!get || get(&real) != 0) return CKR_GENERAL_ERROR;
        memcpy(&shim, real, sizeof shim);
        shim.f[I_GET_FUNCTION_LIST] = (void *)C_GetFunctionList;
        shim.f[I_OPEN_SESSION] = (void *)w_open_session;
        shim.f[I_GET_SESSION_INFO] = (void *)w_get_session_info;
        shim.f[I_LOGIN] = (void *)w_login;
        shim.f[I_FIND_OBJECTS_INIT] = (void *)w_find_objects_init;
        shim.f[I_SIGN_INIT] = (void *)w_sign_init;
        shim.f[I_SIGN] = (void *)w_sign;
        shim.f[I_GENERATE_RANDOM] = (void *)w_generate_random;
    }
    *out = &shim;
    return 0;
}
