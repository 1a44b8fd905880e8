// kinesalite as a test peer: Kinesis on 127.0.0.1:PORT only, in memory, streams ACTIVE within
// milliseconds.
//
// Usage: node serve.js PORT NODE_MODULES
//
// NODE_MODULES is the `node_modules` folder that `./tests/run.sh` installed this folder's
// package-lock.json into (outside the checkout, in its cache). Prints
// `kinesalite ready on 127.0.0.1:PORT` once it accepts connections; the harness
// (`pipeline_e2e::Kinesalite`) waits for that line. kinesalite's own CLI binds every interface,
// hence this wrapper.
'use strict'

const path = require('path')

const port = Number(process.argv[2])
const modules = process.argv[3]
if (!Number.isInteger(port) || port < 1 || port > 65535 || !modules) {
  console.error(`usage: node serve.js PORT NODE_MODULES (got ${JSON.stringify(process.argv.slice(2))})`)
  process.exit(64)
}
const kinesalite = require(path.resolve(modules, 'kinesalite'))

// No `path`: kinesalite keeps everything in memdown. The delays stand for AWS's CREATING,
// DELETING and UPDATING phases; 500 ms each by default, which only slows the tests down.
const server = kinesalite({ createStreamMs: 20, deleteStreamMs: 20, updateStreamMs: 20 })

server.on('error', (error) => {
  console.error(`kinesalite cannot listen on 127.0.0.1:${port}: ${error.message}`)
  process.exit(1)
})

server.listen(port, '127.0.0.1', () => {
  console.log(`kinesalite ready on 127.0.0.1:${port}`)
})

// The harness kills this process group when its guard drops. A test process that dies without
// unwinding drops nothing; this process is then reparented, and stops itself instead of holding
// the port.
const parent = process.ppid
setInterval(() => {
  if (process.ppid !== parent) {
    process.exit(0)
  }
}, 500).unref()
