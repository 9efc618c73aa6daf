/*
 * The one header bindgen reads (build.rs). It names the QEMU interfaces the glue in
 * src/glue/ uses; build.rs allowlists the items so the bindings stay small.
 */
#include "qemu/osdep.h"
#include "block/block_int.h"
#include "block/dirty-bitmap.h"
#include "block/qdict.h"
#include "qemu/coroutine.h"
#include "qemu/iov.h"
#include "qemu/option.h"
#include "qapi/error.h"
#include "qemu/error-report.h"
#include "qapi/qmp/qdict.h"
#include "qapi/qmp/qstring.h"
#include "sysemu/block-backend.h"
#include "crypto/block.h"
#include "block/crypto.h"
#include "qapi/qmp/qobject.h"

/* Exported by Rust (src/glue/driver.rs), called from QEMU's block/qcow2b.c at start-up. */
void qcow2b_register(void);
