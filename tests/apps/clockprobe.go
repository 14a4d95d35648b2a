// clockprobe.go: the Go runtime's reads of the clock, for clock-skew's test of a static Go
// binary (CGO_ENABLED=0: no libc, Go's own vDSO calls). Every 20 ms, one line in
// clockprobe.c's format: TAG PID time.Now() (the vDSO) | clock_gettime(REALTIME) as a direct
// system call | syscall.Gettimeofday (us) | time.Now().Unix() (s) | clock_gettime(MONOTONIC)
// as a direct system call (ns). Go reads CLOCK_MONOTONIC through the vDSO too, so the last
// one is read raw to compare with the test's own.
package main

import (
	"fmt"
	"os"
	"syscall"
	"time"
	"unsafe"
)

func raw(clock uintptr) int64 {
	var ts syscall.Timespec
	syscall.RawSyscall(syscall.SYS_CLOCK_GETTIME, clock, uintptr(unsafe.Pointer(&ts)), 0)
	return ts.Nano()
}

func main() {
	tag := "go"
	if len(os.Args) > 1 {
		tag = os.Args[1]
	}
	for {
		v := time.Now().UnixNano()
		s := raw(0)
		var tv syscall.Timeval
		syscall.Gettimeofday(&tv)
		t := time.Now().Unix()
		m := raw(1)
		fmt.Printf("%s %d %d %d %d %d %d\n", tag, os.Getpid(), v, s, tv.Sec*1000000+tv.Usec, t, m)
		time.Sleep(20 * time.Millisecond)
	}
}
