// Command descset writes a FileDescriptorSet holding the REv2
// remote_execution.proto and everything it imports, taken from the Go
// registry of the modules in go.mod. protoc reads it with
// --descriptor_set_in, so generating remoteworker.pb.go needs neither the
// googleapis nor the remote-apis .proto sources on disk.
package main

import (
	"fmt"
	"os"

	_ "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	_ "google.golang.org/protobuf/types/known/anypb"
	_ "google.golang.org/protobuf/types/known/emptypb"
	_ "google.golang.org/protobuf/types/known/timestamppb"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: descset OUT")
		os.Exit(2)
	}
	set := &descriptorpb.FileDescriptorSet{}
	seen := map[string]bool{}
	var add func(fd protoreflect.FileDescriptor)
	add = func(fd protoreflect.FileDescriptor) {
		if seen[fd.Path()] {
			return
		}
		seen[fd.Path()] = true
		imports := fd.Imports()
		for i := 0; i < imports.Len(); i++ {
			add(imports.Get(i).FileDescriptor)
		}
		set.File = append(set.File, protodesc.ToFileDescriptorProto(fd))
	}
	for _, path := range []string{
		"build/bazel/remote/execution/v2/remote_execution.proto",
		"google/protobuf/any.proto",
		"google/protobuf/empty.proto",
		"google/protobuf/timestamp.proto",
	} {
		fd, err := protoregistry.GlobalFiles.FindFileByPath(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "descset: %s: %v\n", path, err)
			os.Exit(1)
		}
		add(fd)
	}
	b, err := proto.Marshal(set)
	if err != nil {
		fmt.Fprintf(os.Stderr, "descset: %v\n", err)
		os.Exit(1)
	}
	if err := os.WriteFile(os.Args[1], b, 0o644); err != nil {
		fmt.Fprintf(os.Stderr, "descset: %v\n", err)
		os.Exit(1)
	}
}
