// Cis2Client.cs: a client for the cis2-agent local socket (JSON-RPC 2.0, one JSON object per line).
// See docs/ipc.md for the protocol.
//
// One source for .NET Framework 4.6.1 or later (Windows), .NET 6 or later (Windows, Linux) and Mono 6.8
// (Linux): C# 7 and the base class library only, nothing from NuGet.
// - Linux: a Socket with the small UnixSocketEndPoint below. UnixDomainSocketEndPoint is .NET Core 2.1+
//   only (neither .NET Framework nor Mono 6.8 has it); a sockaddr_un is simple enough to build here.
// - Windows: NamedPipeClientStream on the agent's pipe \\.\pipe\cis2-agent-<user SID>.
// - JSON: the small reader and writer in the Json class below. System.Text.Json is not part of .NET
//   Framework or Mono, and DataContractJsonSerializer needs a class for every message shape; the
//   agent's messages are small, so about 150 lines of plain code read them.
//
// The project compiles and runs this file in its tests with Debian's Mono (mono-mcs, mono-runtime):
//   mcs -langversion:7 -out:Cis2Client.exe Cis2Client.cs
//   mono Cis2Client.exe /path/to/agent.sock [--watch]
// With .NET 6+: `dotnet new console`, replace Program.cs with this file, `dotnet run -- /path/to/agent.sock`.
// With .NET Framework: `csc Cis2Client.cs` (Developer Command Prompt), then `Cis2Client.exe`.
// Without a path it uses $CIS2_AGENT_SOCK, else the agent's default place.

using System;
using System.Collections;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.IO.Pipes;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Security.Principal;
using System.Text;
using System.Threading;
using System.Threading.Tasks;

namespace Cis2Agent.Client
{
    /// <summary>The agent answered with a JSON-RPC error. <see cref="Code"/> is one of the codes in docs/ipc.md.</summary>
    public sealed class Cis2AgentException : Exception
    {
        public int Code { get; private set; }

        public Cis2AgentException(int code, string message) : base(message)
        {
            Code = code;
        }
    }

    /// <summary>The result of the <c>token</c> method.</summary>
    public sealed class TokenResult
    {
        public string AccessToken { get; set; }
        public string TokenType { get; set; }
        public long ExpiresAt { get; set; }
    }

    /// <summary>
    /// One connection to the agent. Calls may be made from several threads at once; answers are matched
    /// to calls by id. Events (after <see cref="SubscribeAsync"/>) are taken from <see cref="Events"/>,
    /// which is completed when the connection closes: from then on treat the session as unknown
    /// (docs/ipc.md, "When the connection closes").
    /// </summary>
    public sealed class Cis2Client : IDisposable
    {
        private static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(30);

        private readonly Socket _socket;
        private readonly Stream _stream;
        private readonly StreamReader _reader;
        private readonly SemaphoreSlim _writeLock = new SemaphoreSlim(1, 1);
        private readonly ConcurrentDictionary<long, TaskCompletionSource<object>> _pending =
            new ConcurrentDictionary<long, TaskCompletionSource<object>>();
        private readonly Thread _readThread;
        private volatile bool _closed;
        private long _nextId;

        /// <summary>
        /// The <c>params</c> of each event notification, in order: an object with <c>type</c>
        /// (signed_in, signed_out, token_refreshed, role_changed, locked, unlocked, agent_stopping, resync, ...)
        /// and the fields of that type. Completed (no more items) when the connection closes.
        /// </summary>
        public BlockingCollection<IDictionary<string, object>> Events { get; private set; }

        private Cis2Client(Socket socket, Stream stream)
        {
            _socket = socket;
            _stream = stream;
            _reader = new StreamReader(_stream, new UTF8Encoding(false));
            Events = new BlockingCollection<IDictionary<string, object>>();
            _readThread = new Thread(ReadLoop) { IsBackground = true, Name = "cis2-agent reader" };
            _readThread.Start();
        }

        internal static bool IsWindows
        {
            get { return Environment.OSVersion.Platform == PlatformID.Win32NT; }
        }

        internal static bool IsLinux
        {
            get { return !IsWindows && File.Exists("/proc/self/status"); }
        }

        /// <summary>
        /// The rule of docs/ipc.md ("Where the socket is"), the same as the agent's: $CIS2_AGENT_SOCK, else
        /// on Windows \\.\pipe\cis2-agent-&lt;user SID&gt;, else $XDG_RUNTIME_DIR/cis2-agent/agent.sock, else
        /// /tmp/cis2-agent-&lt;uid&gt;/agent.sock unless that folder exists and is not this user's own folder,
        /// then $HOME/.cache/cis2-agent/agent.sock (Linux; elsewhere set CIS2_AGENT_SOCK).
        /// </summary>
        public static string DefaultSocketPath()
        {
            string fromEnv = Environment.GetEnvironmentVariable("CIS2_AGENT_SOCK");
            if (!string.IsNullOrEmpty(fromEnv))
            {
                return fromEnv;
            }
            if (IsWindows)
            {
                return @"\\.\pipe\cis2-agent-" + WindowsIdentity.GetCurrent().User;
            }
            string runtime = Environment.GetEnvironmentVariable("XDG_RUNTIME_DIR");
            if (!string.IsNullOrEmpty(runtime) && Path.IsPathRooted(runtime))
            {
                return Path.Combine(runtime, "cis2-agent", "agent.sock");
            }
            if (!IsLinux)
            {
                throw new InvalidOperationException(
                    "Cannot work out the agent's socket: set CIS2_AGENT_SOCK to its path.");
            }
            uint uid = Native.getuid();
            string shared = "/tmp/cis2-agent-" + uid;
            string home = Environment.GetEnvironmentVariable("HOME");
            uint owner, mode;
            bool squatted = Native.TryLstat(shared, out owner, out mode)
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
        public static async Task<Cis2Client> ConnectAsync(string path, CancellationToken cancellationToken = default(CancellationToken))
        {
            if (IsWindows)
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
                        throw new UnauthorizedAccessException(path + " belongs to " + pipeOwner + ", not to this user's agent");
                    }
                }
                catch
                {
                    pipe.Dispose();
                    throw;
                }
                return new Cis2Client(null, pipe);
            }
            if (!IsLinux)
            {
                throw new PlatformNotSupportedException(
                    "This example checks who the agent is on Linux and Windows only; it will not talk to an unchecked agent.");
            }
            uint me = Native.geteuid();
            string folder = Path.GetDirectoryName(Path.GetFullPath(path)) ?? "/";
            uint owner, mode;
            if (!Native.TryLstat(folder, out owner, out mode))
            {
                throw new SocketException((int)SocketError.AddressNotAvailable);
            }
            if (!Native.IsDirectory(mode) || owner != me || (mode & 0x3F) != 0)
            {
                throw new UnauthorizedAccessException(
                    "The agent's socket folder " + folder + " belongs to uid " + owner + " (mode " + Convert.ToString(mode & 0xFFF, 8) + "); " +
                    "it must be a folder of yours (uid " + me + ") with mode 700. It may be another user's fake agent, so nothing was sent.");
            }
            var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                var endPoint = new UnixSocketEndPoint(path);
                await Task.Factory.FromAsync(socket.BeginConnect, socket.EndConnect, (EndPoint)endPoint, null);
                uint server = Native.PeerUid(socket);
                if (server != me)
                {
                    throw new UnauthorizedAccessException(
                        "The program listening at " + path + " runs as uid " + server + ", not as you: it is not your agent, so nothing was sent.");
                }
            }
            catch
            {
                socket.Dispose();
                throw;
            }
            return new Cis2Client(socket, new NetworkStream(socket, true));
        }

        /// <summary>
        /// The rule of docs/ipc.md for a closed connection, step 2: connect again, waiting 1 s, then twice as
        /// long each time up to 30 s, until an agent answers or <paramref name="cancellationToken"/> is
        /// cancelled. A socket or pipe that is not this user's agent is not retried (the exception is thrown).
        /// </summary>
        public static async Task<Cis2Client> ReconnectAsync(string path, CancellationToken cancellationToken = default(CancellationToken))
        {
            TimeSpan wait = TimeSpan.FromSeconds(1);
            while (true)
            {
                await Task.Delay(wait, cancellationToken);
                try
                {
                    return await ConnectAsync(path, cancellationToken);
                }
                catch (Exception e) when (e is SocketException || e is IOException || e is TimeoutException)
                {
                    wait = TimeSpan.FromSeconds(Math.Min(30, wait.TotalSeconds * 2));
                }
            }
        }

        /// <summary>
        /// Calls <paramref name="method"/> with named parameters (null for none) and returns the result: an
        /// <c>IDictionary&lt;string, object&gt;</c> for an object (see <see cref="Json"/> for the other types).
        /// Throws <see cref="Cis2AgentException"/> when the agent answers with an error, <see cref="IOException"/>
        /// when the connection closes first, <see cref="TimeoutException"/> when no answer comes in time.
        /// <c>login</c> and <c>change_role</c> wait for the person in the browser: give them several minutes.
        /// </summary>
        public async Task<object> CallAsync(
            string method,
            IDictionary<string, object> parameters = null,
            TimeSpan? timeout = null,
            CancellationToken cancellationToken = default(CancellationToken))
        {
            long id = Interlocked.Increment(ref _nextId);
            var answer = new TaskCompletionSource<object>(TaskCreationOptions.RunContinuationsAsynchronously);
            _pending[id] = answer;
            try
            {
                if (_closed)
                {
                    throw new IOException("The connection to the agent is closed.");
                }
                var request = new Dictionary<string, object>
                {
                    { "jsonrpc", "2.0" },
                    { "id", id },
                    { "method", method },
                    { "params", parameters ?? new Dictionary<string, object>() },
                };
                byte[] line = new UTF8Encoding(false).GetBytes(Json.Write(request) + "\n");

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

                Task limit = Task.Delay(timeout ?? DefaultTimeout, cancellationToken);
                if (await Task.WhenAny(answer.Task, limit) != answer.Task)
                {
                    cancellationToken.ThrowIfCancellationRequested();
                    throw new TimeoutException("The agent did not answer " + method + " in time.");
                }
                return await answer.Task;
            }
            finally
            {
                TaskCompletionSource<object> ignored;
                _pending.TryRemove(id, out ignored);
            }
        }

        /// <summary>Asks the agent for events; take them from <see cref="Events"/>.</summary>
        public Task<object> SubscribeAsync()
        {
            return CallAsync("subscribe");
        }

        public async Task<IDictionary<string, object>> StatusAsync()
        {
            return Json.Obj(await CallAsync("status"));
        }

        public async Task<IDictionary<string, object>> LoginAsync(int timeoutSecs = 300)
        {
            var parameters = new Dictionary<string, object> { { "timeout_secs", timeoutSecs } };
            return Json.Obj(await CallAsync("login", parameters, TimeSpan.FromSeconds(timeoutSecs + 30)));
        }

        public async Task<IDictionary<string, object>> WhoAmIAsync()
        {
            return Json.Obj(await CallAsync("whoami"));
        }

        public async Task<TokenResult> TokenAsync(int minValidSecs = 60)
        {
            var parameters = new Dictionary<string, object> { { "min_valid_secs", minValidSecs } };
            IDictionary<string, object> result = Json.Obj(await CallAsync("token", parameters, TimeSpan.FromSeconds(90)));
            return new TokenResult
            {
                AccessToken = Json.Str(result, "access_token") ?? "",
                TokenType = Json.Str(result, "token_type") ?? "",
                ExpiresAt = Json.Long(result, "expires_at") ?? 0,
            };
        }

        public Task<object> LogoutAsync()
        {
            return CallAsync("logout", null, TimeSpan.FromSeconds(60));
        }

        private void ReadLoop()
        {
            Exception failure = null;
            try
            {
                while (true)
                {
                    string line = _reader.ReadLine();
                    if (line == null)
                    {
                        break;
                    }
                    if (line.Length == 0)
                    {
                        continue;
                    }
                    IDictionary<string, object> message = Json.Obj(Json.Parse(line));
                    if (message == null)
                    {
                        continue;
                    }
                    if (Json.Str(message, "method") == "event")
                    {
                        IDictionary<string, object> parameters = Json.Obj(Json.Get(message, "params"));
                        if (parameters != null)
                        {
                            Events.Add(parameters);
                        }
                        continue;
                    }
                    // Answers with "id": null (a line the agent could not read, or "too many connections")
                    // belong to no call and are dropped here.
                    long? id = Json.Long(message, "id");
                    TaskCompletionSource<object> answer;
                    if (id == null || !_pending.TryRemove(id.Value, out answer))
                    {
                        continue;
                    }
                    IDictionary<string, object> error = Json.Obj(Json.Get(message, "error"));
                    if (error != null)
                    {
                        answer.TrySetException(new Cis2AgentException(
                            (int)(Json.Long(error, "code") ?? 0), Json.Str(error, "message") ?? ""));
                    }
                    else if (message.ContainsKey("result"))
                    {
                        answer.TrySetResult(message["result"]);
                    }
                    else
                    {
                        answer.TrySetException(new IOException("An answer with neither result nor error."));
                    }
                }
            }
            catch (Exception e)
            {
                failure = e;
            }
            _closed = true;
            var closed = new IOException("The agent closed the connection.", failure);
            foreach (long id in _pending.Keys)
            {
                TaskCompletionSource<object> answer;
                if (_pending.TryRemove(id, out answer))
                {
                    answer.TrySetException(closed);
                }
            }
            Events.CompleteAdding();
        }

        public void Dispose()
        {
            try
            {
                if (_socket != null)
                {
                    _socket.Shutdown(SocketShutdown.Both);
                }
            }
            catch (SocketException)
            {
            }
            catch (ObjectDisposedException)
            {
            }
            _stream.Dispose();
            _readThread.Join(TimeSpan.FromSeconds(5));
        }
    }

    /// <summary>
    /// A Unix domain socket's address (struct sockaddr_un: the family in two bytes, then the path and a
    /// NUL), for .NET Framework, Mono and .NET alike. On .NET 6+ System.Net.Sockets.UnixDomainSocketEndPoint
    /// does the same.
    /// </summary>
    public sealed class UnixSocketEndPoint : EndPoint
    {
        private const int PathOffset = 2, MaxPath = 107;

        public string Path { get; private set; }

        public UnixSocketEndPoint(string path)
        {
            if (path == null || Encoding.UTF8.GetByteCount(path) > MaxPath)
            {
                throw new ArgumentException("A Unix socket path of 1 to " + MaxPath + " bytes is needed.", "path");
            }
            Path = path;
        }

        public override AddressFamily AddressFamily
        {
            get { return AddressFamily.Unix; }
        }

        public override SocketAddress Serialize()
        {
            byte[] bytes = Encoding.UTF8.GetBytes(Path);
            var address = new SocketAddress(AddressFamily.Unix, PathOffset + bytes.Length + 1);
            for (int i = 0; i < bytes.Length; i++)
            {
                address[PathOffset + i] = bytes[i];
            }
            address[PathOffset + bytes.Length] = 0;
            return address;
        }

        public override EndPoint Create(SocketAddress socketAddress)
        {
            var bytes = new List<byte>();
            for (int i = PathOffset; i < socketAddress.Size && socketAddress[i] != 0; i++)
            {
                bytes.Add(socketAddress[i]);
            }
            return new UnixSocketEndPoint(Encoding.UTF8.GetString(bytes.ToArray()));
        }

        public override string ToString()
        {
            return Path;
        }
    }

    /// <summary>
    /// The JSON the agent speaks, read into plain objects: an object is an
    /// <c>IDictionary&lt;string, object&gt;</c>, an array a <c>List&lt;object&gt;</c>, a string a
    /// <c>string</c>, a whole number a <c>long</c> (others a <c>double</c>), true/false a <c>bool</c>,
    /// null <c>null</c>. <see cref="Write"/> does the reverse for requests.
    /// </summary>
    public static class Json
    {
        public static object Get(IDictionary<string, object> o, string key)
        {
            object value;
            return o != null && o.TryGetValue(key, out value) ? value : null;
        }

        public static IDictionary<string, object> Obj(object value)
        {
            return value as IDictionary<string, object>;
        }

        public static string Str(IDictionary<string, object> o, string key)
        {
            return Get(o, key) as string;
        }

        public static long? Long(IDictionary<string, object> o, string key)
        {
            object value = Get(o, key);
            return value is long ? (long?)(long)value : null;
        }

        public static object Parse(string text)
        {
            int at = 0;
            object value = ReadValue(text, ref at);
            SkipSpace(text, ref at);
            if (at != text.Length)
            {
                throw Bad(at);
            }
            return value;
        }

        private static FormatException Bad(int at)
        {
            return new FormatException("The agent sent JSON that cannot be read (at character " + at + ").");
        }

        private static void SkipSpace(string s, ref int at)
        {
            while (at < s.Length && (s[at] == ' ' || s[at] == '\t' || s[at] == '\r' || s[at] == '\n'))
            {
                at++;
            }
        }

        private static void Expect(string s, ref int at, char c)
        {
            SkipSpace(s, ref at);
            if (at >= s.Length || s[at] != c)
            {
                throw Bad(at);
            }
            at++;
        }

        private static object ReadValue(string s, ref int at)
        {
            SkipSpace(s, ref at);
            if (at >= s.Length)
            {
                throw Bad(at);
            }
            char c = s[at];
            if (c == '{')
            {
                at++;
                var o = new Dictionary<string, object>();
                SkipSpace(s, ref at);
                if (at < s.Length && s[at] == '}')
                {
                    at++;
                    return o;
                }
                while (true)
                {
                    SkipSpace(s, ref at);
                    string key = ReadString(s, ref at);
                    Expect(s, ref at, ':');
                    o[key] = ReadValue(s, ref at);
                    SkipSpace(s, ref at);
                    if (at < s.Length && s[at] == ',')
                    {
                        at++;
                        continue;
                    }
                    Expect(s, ref at, '}');
                    return o;
                }
            }
            if (c == '[')
            {
                at++;
                var a = new List<object>();
                SkipSpace(s, ref at);
                if (at < s.Length && s[at] == ']')
                {
                    at++;
                    return a;
                }
                while (true)
                {
                    a.Add(ReadValue(s, ref at));
                    SkipSpace(s, ref at);
                    if (at < s.Length && s[at] == ',')
                    {
                        at++;
                        continue;
                    }
                    Expect(s, ref at, ']');
                    return a;
                }
            }
            if (c == '"')
            {
                return ReadString(s, ref at);
            }
            foreach (var literal in new[] { "true", "false", "null" })
            {
                if (string.CompareOrdinal(s, at, literal, 0, literal.Length) == 0)
                {
                    at += literal.Length;
                    return literal == "null" ? null : (object)(literal == "true");
                }
            }
            int start = at;
            while (at < s.Length && "+-0123456789.eE".IndexOf(s[at]) >= 0)
            {
                at++;
            }
            string number = s.Substring(start, at - start);
            long whole;
            double real;
            if (long.TryParse(number, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out whole))
            {
                return whole;
            }
            if (number.Length > 0 && double.TryParse(number, NumberStyles.Float, CultureInfo.InvariantCulture, out real))
            {
                return real;
            }
            throw Bad(start);
        }

        private static string ReadString(string s, ref int at)
        {
            if (at >= s.Length || s[at] != '"')
            {
                throw Bad(at);
            }
            at++;
            var text = new StringBuilder();
            while (at < s.Length)
            {
                char c = s[at++];
                if (c == '"')
                {
                    return text.ToString();
                }
                if (c != '\\')
                {
                    text.Append(c);
                    continue;
                }
                if (at >= s.Length)
                {
                    break;
                }
                char e = s[at++];
                switch (e)
                {
                    case 'b': text.Append('\b'); break;
                    case 'f': text.Append('\f'); break;
                    case 'n': text.Append('\n'); break;
                    case 'r': text.Append('\r'); break;
                    case 't': text.Append('\t'); break;
                    case 'u':
                        if (at + 4 > s.Length)
                        {
                            throw Bad(at);
                        }
                        text.Append((char)int.Parse(s.Substring(at, 4), NumberStyles.HexNumber, CultureInfo.InvariantCulture));
                        at += 4;
                        break;
                    default: text.Append(e); break; // \" \\ \/
                }
            }
            throw Bad(at);
        }

        /// <summary>Compact JSON for a request: dictionaries, lists, strings, numbers, bools and null.</summary>
        public static string Write(object value)
        {
            var json = new StringBuilder();
            WriteValue(json, value);
            return json.ToString();
        }

        private static void WriteValue(StringBuilder json, object value)
        {
            if (value == null)
            {
                json.Append("null");
            }
            else if (value is bool)
            {
                json.Append((bool)value ? "true" : "false");
            }
            else if (value is string)
            {
                WriteString(json, (string)value);
            }
            else if (value is int || value is long || value is uint || value is double)
            {
                json.Append(Convert.ToString(value, CultureInfo.InvariantCulture));
            }
            else if (value is IDictionary<string, object>)
            {
                json.Append('{');
                bool first = true;
                foreach (var pair in (IDictionary<string, object>)value)
                {
                    if (!first)
                    {
                        json.Append(',');
                    }
                    first = false;
                    WriteString(json, pair.Key);
                    json.Append(':');
                    WriteValue(json, pair.Value);
                }
                json.Append('}');
            }
            else if (value is IEnumerable)
            {
                json.Append('[');
                bool first = true;
                foreach (object item in (IEnumerable)value)
                {
                    if (!first)
                    {
                        json.Append(',');
                    }
                    first = false;
                    WriteValue(json, item);
                }
                json.Append(']');
            }
            else
            {
                throw new ArgumentException("Cannot write a " + value.GetType() + " as JSON.");
            }
        }

        private static void WriteString(StringBuilder json, string text)
        {
            json.Append('"');
            foreach (char c in text)
            {
                if (c == '"' || c == '\\')
                {
                    json.Append('\\').Append(c);
                }
                else if (c < ' ')
                {
                    json.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                }
                else
                {
                    json.Append(c);
                }
            }
            json.Append('"');
        }
    }

    /// <summary>
    /// The example: status, login, whoami, token, and the events that came meanwhile. Prints the token's
    /// length and expiry, never the token. With <c>--watch</c> it then shows events until the session ends,
    /// following docs/ipc.md when the connection closes (the agent stopping, crashing or restarting):
    /// reconnect, subscribe, status, and compare the user and role with those shown.
    /// Exit codes: 0 done; 1 the agent answered with an error, or it is not this user's agent; 3 no agent at the socket.
    /// </summary>
    public static class Program
    {
        public static int Main(string[] args)
        {
            return RunAsync(args).GetAwaiter().GetResult();
        }

        private static async Task<int> RunAsync(string[] args)
        {
            bool watch = Array.IndexOf(args, "--watch") >= 0;
            string path = null;
            foreach (string arg in args)
            {
                if (arg != "--watch")
                {
                    path = arg;
                }
            }
            path = path ?? Cis2Client.DefaultSocketPath();
            Cis2Client agent;
            try
            {
                agent = await Cis2Client.ConnectAsync(path);
            }
            catch (Exception e) when (e is SocketException || e is TimeoutException)
            {
                Console.Error.WriteLine("No agent is listening at " + path + ": " + e.Message);
                return 3;
            }
            catch (UnauthorizedAccessException e)
            {
                Console.Error.WriteLine(e.Message);
                return 1;
            }

            try
            {
                await agent.SubscribeAsync();

                IDictionary<string, object> status = await agent.StatusAsync();
                string environment = Json.Str(status, "environment");
                if (environment == "sandbox")
                {
                    Console.WriteLine("SANDBOX: not NHS CIS2 (test users only)");
                }
                Console.WriteLine("environment: " + environment + ", state: " + Json.Str(status, "state"));

                status = await agent.LoginAsync(300);
                Console.WriteLine("after login: " + Json.Str(status, "state"));

                IDictionary<string, object> user = await agent.WhoAmIAsync();
                Console.WriteLine("user: " + Json.Str(user, "name") + " (" + Json.Str(user, "uid") + ")");
                IDictionary<string, object> role = Json.Obj(Json.Get(user, "selected_role"));
                Console.WriteLine(role == null
                    ? "selected role: none"
                    : "selected role: " + Json.Str(role, "name") + " at " + Json.Str(role, "org_code"));

                TokenResult token = await agent.TokenAsync(60);
                DateTimeOffset expires = new DateTimeOffset(1970, 1, 1, 0, 0, 0, TimeSpan.Zero).AddSeconds(token.ExpiresAt);
                Console.WriteLine("access token: " + token.AccessToken.Length + " characters, " + token.TokenType +
                    ", expires " + expires.ToString("u", CultureInfo.InvariantCulture));

                IDictionary<string, object> early;
                while (agent.Events.TryTake(out early))
                {
                    Console.WriteLine("event: " + Json.Str(early, "type"));
                }
                if (!watch)
                {
                    return 0;
                }
                return await WatchAsync(agent, path, Json.Str(user, "uid"), role == null ? null : Json.Str(role, "id"));
            }
            catch (Cis2AgentException e)
            {
                Console.Error.WriteLine("The agent said (" + e.Code + "): " + e.Message);
                return 1;
            }
            catch (UnauthorizedAccessException e)
            {
                Console.Error.WriteLine(e.Message);
                return 1;
            }
            catch (Exception e) when (e is IOException || e is SocketException || e is TimeoutException)
            {
                Console.Error.WriteLine("The connection to the agent failed: " + e.Message);
                return 1;
            }
            finally
            {
                agent.Dispose();
            }
        }

        /// <summary>
        /// What an EHR does while the clinician works: reacts to events, and when the connection closes
        /// treats the session as unknown until a new connection's status shows the same user and role.
        /// Returns when the session has ended. The caller disposes <paramref name="agent"/>; this disposes
        /// the connections it makes itself.
        /// </summary>
        private static async Task<int> WatchAsync(Cis2Client agent, string path, string shownUid, string shownRoleId)
        {
            Console.WriteLine("watching events");
            Cis2Client current = agent;
            try
            {
                while (true)
                {
                    foreach (IDictionary<string, object> e in current.Events.GetConsumingEnumerable())
                    {
                        string type = Json.Str(e, "type");
                        if (type == "agent_stopping")
                        {
                            bool survives = Json.Get(e, "session_survives") is bool && (bool)Json.Get(e, "session_survives");
                            Console.WriteLine("event: agent_stopping (session_survives: " + (survives ? "true" : "false") + ")");
                            if (!survives)
                            {
                                Console.WriteLine("the session is gone: act as for signed_out (stop using the token)");
                                return 0;
                            }
                        }
                        else if (type == "signed_out")
                        {
                            Console.WriteLine("event: signed_out (" + Json.Str(e, "reason") + ")");
                            return 0;
                        }
                        else if (type == "role_changed")
                        {
                            IDictionary<string, object> newRole = Json.Obj(Json.Get(Json.Obj(Json.Get(e, "user")), "selected_role"));
                            shownRoleId = newRole == null ? null : Json.Str(newRole, "id");
                            Console.WriteLine("event: role_changed (" + (newRole == null ? "none" : Json.Str(newRole, "name")) + ")");
                        }
                        else
                        {
                            // token_refreshed, locked, unlocked, resync (then ask for status), and types not known yet.
                            Console.WriteLine("event: " + type);
                        }
                    }

                    // The connection closed: the user and role shown are unconfirmed from now on.
                    Console.WriteLine("connection closed: the session is unknown; reconnecting");
                    Cis2Client next = await Cis2Client.ReconnectAsync(path);
                    if (current != agent)
                    {
                        current.Dispose();
                    }
                    current = next;
                    await current.SubscribeAsync();
                    IDictionary<string, object> status = await current.StatusAsync();
                    IDictionary<string, object> user = Json.Obj(Json.Get(status, "user"));
                    IDictionary<string, object> role = Json.Obj(Json.Get(user, "selected_role"));
                    string state = Json.Str(status, "state");
                    if (state != "signed_in" || Json.Str(user, "uid") != shownUid
                        || (role == null ? null : Json.Str(role, "id")) != shownRoleId)
                    {
                        Console.WriteLine("after reconnecting: " + state + ", not the session shown: act as for signed_out");
                        return 0;
                    }
                    Console.WriteLine("after reconnecting: the same user and role; carrying on");
                }
            }
            finally
            {
                if (current != agent)
                {
                    current.Dispose();
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

        internal static bool IsDirectory(uint mode)
        {
            return (mode & 0xF000) == 0x4000;
        }

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
