// Cis2Client.cs: a client for the cis2-agent local socket (JSON-RPC 2.0, one JSON object per line).
// See docs/ipc.md for the protocol.
//
// .NET 6 or later. It uses only the base class library: Socket with UnixDomainSocketEndPoint on Linux
// and macOS, NamedPipeClientStream on Windows (the agent's named pipe \\.\pipe\cis2-agent-<user SID>),
// and System.Text.Json.
//
// NOTE: this file has not been compiled by the project (there is no .NET SDK on the build machines).
// The Python example (cis2_client.py) has been run against the agent.
//
// To try it: `dotnet new console`, replace Program.cs with this file, then
// `dotnet run -- /path/to/agent.sock` (or set CIS2_AGENT_SOCK).

using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.IO;
using System.IO.Pipes;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Security.Principal;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using System.Threading;
using System.Threading.Channels;
using System.Threading.Tasks;

namespace Cis2Agent.Client
{
    /// <summary>The agent answered with a JSON-RPC error. <see cref="Code"/> is one of the codes in docs/ipc.md.</summary>
    public sealed class Cis2AgentException : Exception
    {
        public int Code { get; }

        public Cis2AgentException(int code, string message) : base(message)
        {
            Code = code;
        }
    }

    /// <summary>The result of the <c>token</c> method.</summary>
    public sealed class TokenResult
    {
        [JsonPropertyName("access_token")] public string AccessToken { get; set; } = "";
        [JsonPropertyName("token_type")] public string TokenType { get; set; } = "";
        [JsonPropertyName("expires_at")] public long ExpiresAt { get; set; }
    }

    /// <summary>
    /// One connection to the agent. Calls may be made from several tasks at once; answers are matched
    /// to calls by id. Events (after <see cref="SubscribeAsync"/>) are read from <see cref="Events"/>.
    /// </summary>
    public sealed class Cis2Client : IAsyncDisposable
    {
        private static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(30);

        private readonly Socket? _socket;
        private readonly Stream _stream;
        private readonly StreamReader _reader;
        private readonly SemaphoreSlim _writeLock = new SemaphoreSlim(1, 1);
        private readonly ConcurrentDictionary<long, TaskCompletionSource<JsonElement>> _pending =
            new ConcurrentDictionary<long, TaskCompletionSource<JsonElement>>();
        private readonly Channel<JsonElement> _events = Channel.CreateUnbounded<JsonElement>();
        private readonly Task _readLoop;
        private long _nextId;

        private Cis2Client(Socket? socket, Stream stream)
        {
            _socket = socket;
            _stream = stream;
            _reader = new StreamReader(_stream, new UTF8Encoding(false));
            _readLoop = Task.Run(ReadLoopAsync);
        }

        /// <summary>
        /// The rule of docs/ipc.md ("Where the socket is"), the same as the agent's: $CIS2_AGENT_SOCK, else
        /// on Windows \\.\pipe\cis2-agent-&lt;user SID&gt;, else $XDG_RUNTIME_DIR/cis2-agent/agent.sock, else
        /// /tmp/cis2-agent-&lt;uid&gt;/agent.sock unless that folder exists and is not this user's own folder,
        /// then $HOME/.cache/cis2-agent/agent.sock (Linux; elsewhere set CIS2_AGENT_SOCK).
        /// </summary>
        public static string DefaultSocketPath()
        {
            string? fromEnv = Environment.GetEnvironmentVariable("CIS2_AGENT_SOCK");
            if (!string.IsNullOrEmpty(fromEnv))
            {
                return fromEnv;
            }
            if (OperatingSystem.IsWindows())
            {
                return $@"\\.\pipe\cis2-agent-{WindowsIdentity.GetCurrent().User}";
            }
            string? runtime = Environment.GetEnvironmentVariable("XDG_RUNTIME_DIR");
            if (!string.IsNullOrEmpty(runtime) && Path.IsPathRooted(runtime))
            {
                return Path.Combine(runtime, "cis2-agent", "agent.sock");
            }
            if (!OperatingSystem.IsLinux())
            {
                throw new InvalidOperationException(
                    "Cannot work out the agent's socket: set CIS2_AGENT_SOCK to its path.");
            }
            uint uid = Native.getuid();
            string shared = $"/tmp/cis2-agent-{uid}";
            string? home = Environment.GetEnvironmentVariable("HOME");
            bool squatted = Native.TryLstat(shared, out uint owner, out uint mode)
                && (!Native.IsDirectory(mode) || owner != uid);
            if (squatted && !string.IsNullOrEmpty(home) && Path.IsPathRooted(home))
            {
                return Path.Combine(home, ".cache", "cis2-agent", "agent.sock");
            }
            return Path.Combine(shared, "agent.sock");
        }

        /// <summary>
        /// Connects to the agent. Before anything is sent it checks who the agent is: on Windows that the
        /// pipe's server runs as this user; on Linux that the socket's folder is this user's own with mode
        /// 0700 and that the process listening runs as this user (SO_PEERCRED). Otherwise
        /// <see cref="UnauthorizedAccessException"/> says why (another user may have put a fake agent there).
        /// A <see cref="SocketException"/> (Unix) or <see cref="TimeoutException"/> (Windows) means no agent
        /// is listening there.
        /// </summary>
        public static async Task<Cis2Client> ConnectAsync(string path, CancellationToken cancellationToken = default)
        {
            if (OperatingSystem.IsWindows())
            {
                const string prefix = @"\\.\pipe\";
                string name = path.StartsWith(prefix, StringComparison.OrdinalIgnoreCase) ? path.Substring(prefix.Length) : path;
                // Identification only: the agent may learn who we are, never act as us.
                var pipe = new NamedPipeClientStream(".", name, PipeDirection.InOut, PipeOptions.Asynchronous,
                    TokenImpersonationLevel.Identification);
                try
                {
                    await pipe.ConnectAsync(2000, cancellationToken);
                    // The pipe's server must run as this user (a squatter under another account is
                    // refused): the agent's pipe is owned by this user.
                    var pipeOwner = pipe.GetAccessControl().GetOwner(typeof(SecurityIdentifier));
                    if (!Equals(pipeOwner, WindowsIdentity.GetCurrent().User))
                    {
                        throw new UnauthorizedAccessException($"{path} belongs to {pipeOwner}, not to this user's agent");
                    }
                }
                catch
                {
                    pipe.Dispose();
                    throw;
                }
                return new Cis2Client(null, pipe);
            }
            if (!OperatingSystem.IsLinux())
            {
                throw new PlatformNotSupportedException(
                    "This example checks who the agent is on Linux and Windows only; it will not talk to an unchecked agent.");
            }
            uint me = Native.geteuid();
            string folder = Path.GetDirectoryName(Path.GetFullPath(path)) ?? "/";
            if (!Native.TryLstat(folder, out uint owner, out uint mode))
            {
                throw new SocketException((int)SocketError.AddressNotAvailable);
            }
            if (!Native.IsDirectory(mode) || owner != me || (mode & 0x3F) != 0)
            {
                throw new UnauthorizedAccessException(
                    $"The agent's socket folder {folder} belongs to uid {owner} (mode {Convert.ToString(mode & 0xFFF, 8)}); " +
                    $"it must be a folder of yours (uid {me}) with mode 700. It may be another user's fake agent, so nothing was sent.");
            }
            var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                await socket.ConnectAsync(new UnixDomainSocketEndPoint(path), cancellationToken);
                uint server = Native.PeerUid(socket);
                if (server != me)
                {
                    throw new UnauthorizedAccessException(
                        $"The program listening at {path} runs as uid {server}, not as you: it is not your agent, so nothing was sent.");
                }
            }
            catch
            {
                socket.Dispose();
                throw;
            }
            return new Cis2Client(socket, new NetworkStream(socket, ownsSocket: true));
        }

        /// <summary>
        /// Calls <paramref name="method"/> with named parameters (an object or dictionary whose property
        /// names are the JSON names, e.g. <c>new { min_valid_secs = 60 }</c>) and returns the result.
        /// Throws <see cref="Cis2AgentException"/> when the agent answers with an error.
        /// <c>login</c> waits for the person in the browser: give it a timeout of several minutes.
        /// </summary>
        public async Task<JsonElement> CallAsync(
            string method,
            object? parameters = null,
            TimeSpan? timeout = null,
            CancellationToken cancellationToken = default)
        {
            long id = Interlocked.Increment(ref _nextId);
            var answer = new TaskCompletionSource<JsonElement>(TaskCreationOptions.RunContinuationsAsynchronously);
            _pending[id] = answer;
            try
            {
                if (_readLoop.IsCompleted)
                {
                    throw new IOException("The connection to the agent is closed.");
                }
                var request = new Dictionary<string, object?>
                {
                    ["jsonrpc"] = "2.0",
                    ["id"] = id,
                    ["method"] = method,
                    ["params"] = parameters ?? new Dictionary<string, object?>(),
                };
                byte[] json = JsonSerializer.SerializeToUtf8Bytes(request);
                byte[] line = new byte[json.Length + 1];
                json.CopyTo(line, 0);
                line[json.Length] = (byte)'\n';

                await _writeLock.WaitAsync(cancellationToken);
                try
                {
                    await _stream.WriteAsync(line, 0, line.Length, cancellationToken);
                    await _stream.FlushAsync(cancellationToken);
                }
                finally
                {
                    _writeLock.Release();
                }

                using var limit = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
                limit.CancelAfter(timeout ?? DefaultTimeout);
                using (limit.Token.Register(() => answer.TrySetCanceled()))
                {
                    return await answer.Task;
                }
            }
            finally
            {
                _pending.TryRemove(id, out _);
            }
        }

        /// <summary>Asks the agent for events; read them from <see cref="Events"/>.</summary>
        public Task<JsonElement> SubscribeAsync(CancellationToken cancellationToken = default) =>
            CallAsync("subscribe", null, null, cancellationToken);

        /// <summary>
        /// The <c>params</c> of each event notification, in order: an object with <c>type</c>
        /// (signed_in, signed_out, token_refreshed, resync, ...) and the fields of that type.
        /// </summary>
        public IAsyncEnumerable<JsonElement> Events(CancellationToken cancellationToken = default) =>
            _events.Reader.ReadAllAsync(cancellationToken);

        public Task<JsonElement> StatusAsync() => CallAsync("status");

        public Task<JsonElement> LoginAsync(int timeoutSecs = 300) =>
            CallAsync("login", new { timeout_secs = timeoutSecs }, TimeSpan.FromSeconds(timeoutSecs + 30));

        public Task<JsonElement> WhoAmIAsync() => CallAsync("whoami");

        public async Task<TokenResult> TokenAsync(int minValidSecs = 60)
        {
            JsonElement result = await CallAsync("token", new { min_valid_secs = minValidSecs }, TimeSpan.FromSeconds(90));
            return result.Deserialize<TokenResult>()
                ?? throw new IOException("The agent's token answer was empty.");
        }

        public Task<JsonElement> LogoutAsync() => CallAsync("logout", null, TimeSpan.FromSeconds(60));

        private async Task ReadLoopAsync()
        {
            Exception? failure = null;
            try
            {
                while (true)
                {
                    string? line = await _reader.ReadLineAsync();
                    if (line == null)
                    {
                        break;
                    }
                    if (line.Length == 0)
                    {
                        continue;
                    }
                    JsonElement message;
                    using (JsonDocument document = JsonDocument.Parse(line))
                    {
                        message = document.RootElement.Clone();
                    }
                    if (message.TryGetProperty("method", out JsonElement method)
                        && method.ValueKind == JsonValueKind.String
                        && method.GetString() == "event")
                    {
                        if (message.TryGetProperty("params", out JsonElement parameters))
                        {
                            _events.Writer.TryWrite(parameters);
                        }
                        continue;
                    }
                    // Answers with "id": null (a line the agent could not read, or "too many connections")
                    // belong to no call and are dropped here.
                    if (message.TryGetProperty("id", out JsonElement idElement)
                        && idElement.ValueKind == JsonValueKind.Number
                        && idElement.TryGetInt64(out long id)
                        && _pending.TryRemove(id, out TaskCompletionSource<JsonElement>? answer))
                    {
                        if (message.TryGetProperty("error", out JsonElement error))
                        {
                            int code = error.TryGetProperty("code", out JsonElement c) && c.TryGetInt32(out int n) ? n : 0;
                            string text = error.TryGetProperty("message", out JsonElement m) ? m.GetString() ?? "" : "";
                            answer.TrySetException(new Cis2AgentException(code, text));
                        }
                        else if (message.TryGetProperty("result", out JsonElement result))
                        {
                            answer.TrySetResult(result);
                        }
                        else
                        {
                            answer.TrySetException(new IOException("An answer with neither result nor error."));
                        }
                    }
                }
            }
            catch (Exception e)
            {
                failure = e;
            }
            var closed = failure ?? new IOException("The agent closed the connection.");
            foreach (long id in _pending.Keys)
            {
                if (_pending.TryRemove(id, out TaskCompletionSource<JsonElement>? answer))
                {
                    answer.TrySetException(closed);
                }
            }
            _events.Writer.TryComplete(failure);
        }

        public async ValueTask DisposeAsync()
        {
            try
            {
                _socket?.Shutdown(SocketShutdown.Both);
            }
            catch (SocketException)
            {
            }
            catch (ObjectDisposedException)
            {
            }
            _stream.Dispose();
            try
            {
                await _readLoop;
            }
            catch
            {
                // The read loop ends with the connection; nothing to report.
            }
            _writeLock.Dispose();
        }
    }

    /// <summary>
    /// The example: status, login, whoami, token. Prints the token's length and expiry, never the token.
    /// Exit codes: 0 done; 1 the agent answered with an error; 3 no agent at the socket.
    /// </summary>
    public static class Program
    {
        public static async Task<int> Main(string[] args)
        {
            string path = args.Length > 0 ? args[0] : Cis2Client.DefaultSocketPath();
            Cis2Client agent;
            try
            {
                agent = await Cis2Client.ConnectAsync(path);
            }
            catch (SocketException e)
            {
                Console.Error.WriteLine($"No agent is listening at {path}: {e.Message}");
                return 3;
            }
            catch (UnauthorizedAccessException e)
            {
                Console.Error.WriteLine(e.Message);
                return 1;
            }

            await using (agent)
            {
                try
                {
                    using var stop = new CancellationTokenSource();
                    await agent.SubscribeAsync();
                    Task watcher = Task.Run(async () =>
                    {
                        try
                        {
                            await foreach (JsonElement e in agent.Events(stop.Token))
                            {
                                Console.WriteLine($"event: {e.GetProperty("type").GetString()}");
                            }
                        }
                        catch (OperationCanceledException)
                        {
                        }
                    });

                    JsonElement status = await agent.StatusAsync();
                    string environment = status.GetProperty("environment").GetString() ?? "";
                    if (environment == "sandbox")
                    {
                        Console.WriteLine("SANDBOX: not NHS CIS2 (test users only)");
                    }
                    Console.WriteLine($"environment: {environment}, state: {status.GetProperty("state").GetString()}");

                    status = await agent.LoginAsync(300);
                    Console.WriteLine($"after login: {status.GetProperty("state").GetString()}");

                    JsonElement user = await agent.WhoAmIAsync();
                    Console.WriteLine($"user: {user.GetProperty("name").GetString()} ({user.GetProperty("uid").GetString()})");
                    JsonElement role = user.GetProperty("selected_role");
                    Console.WriteLine(role.ValueKind == JsonValueKind.Null
                        ? "selected role: none"
                        : $"selected role: {role.GetProperty("name").GetString()} at {role.GetProperty("org_code").GetString()}");

                    TokenResult token = await agent.TokenAsync(60);
                    DateTimeOffset expires = DateTimeOffset.FromUnixTimeSeconds(token.ExpiresAt);
                    Console.WriteLine($"access token: {token.AccessToken.Length} characters, {token.TokenType}, expires {expires:u}");

                    stop.Cancel();
                    await watcher;
                    return 0;
                }
                catch (Cis2AgentException e)
                {
                    Console.Error.WriteLine($"The agent said ({e.Code}): {e.Message}");
                    return 1;
                }
                catch (Exception e) when (e is IOException || e is SocketException || e is OperationCanceledException)
                {
                    Console.Error.WriteLine($"The connection to the agent failed: {e.Message}");
                    return 1;
                }
            }
        }
    }

    /// <summary>The few libc calls the ownership checks need (Linux, glibc 2.28 or later for statx).</summary>
    internal static class Native
    {
        [DllImport("libc", SetLastError = true)] internal static extern uint getuid();
        [DllImport("libc", SetLastError = true)] internal static extern uint geteuid();
        [DllImport("libc", SetLastError = true)]
        private static extern int statx(int dirfd, string path, int flags, uint mask, byte[] buffer);
        [DllImport("libc", SetLastError = true)]
        private static extern int getsockopt(IntPtr socket, int level, int name, byte[] value, ref int length);

        private const int AtFdCwd = -100, AtSymlinkNoFollow = 0x100;
        private const uint StatxBasicStats = 0x7ff;
        private const int SolSocket = 1, SoPeerCred = 17;

        /// <summary>lstat through statx, whose layout is the same on every architecture: uid at 20, mode at 28.</summary>
        internal static bool TryLstat(string path, out uint owner, out uint mode)
        {
            var buffer = new byte[256];
            owner = 0;
            mode = 0;
            if (statx(AtFdCwd, path, AtSymlinkNoFollow, StatxBasicStats, buffer) != 0)
            {
                return false;
            }
            owner = BitConverter.ToUInt32(buffer, 20);
            mode = BitConverter.ToUInt16(buffer, 28);
            return true;
        }

        internal static bool IsDirectory(uint mode) => (mode & 0xF000) == 0x4000;

        /// <summary>The uid of the process at the other end (struct ucred: pid, uid, gid).</summary>
        internal static uint PeerUid(Socket socket)
        {
            var credentials = new byte[12];
            int length = credentials.Length;
            if (getsockopt(socket.Handle, SolSocket, SoPeerCred, credentials, ref length) != 0)
            {
                throw new SocketException(Marshal.GetLastWin32Error());
            }
            return BitConverter.ToUInt32(credentials, 4);
        }
    }
}
